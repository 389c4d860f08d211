"""Train one configuration into a run directory, resuming from its last epoch checkpoint.

    python -m training.train --config fast --data data --run-dir runs/fast [--epochs N]
        [--export-base models/cifar10]

The run directory gets: config.json, metrics.csv (one row per epoch), tensorboard/, history.png,
checkpoints/ (the last completed epoch), evaluation/ (report, confusion matrix, misclassified
images) and, with --export-base, the exported SavedModel's path in export.json. Killed at any
point, the same command continues from the last completed epoch and ends where an
uninterrupted run would. The test split is only ever evaluated, never trained on.
"""

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorflow as tf
import keras

from training.card import build_card
from training.configs import CONFIGS, PRECISIONS, TrainConfig, get_config
from training.data import (CifarDataError, channel_stats, dataset_label, ensure_cifar10, load_cifar10,
                           validation_indexes)
from training.distill import TEACHER_LOGITS, Distiller, teacher_logits
from training.evaluate import write_evaluation
from training.export import TTA, export_savedmodel
from training.models import build_model, float32_twin
from training.plots import plot_history

STATE = "state.json"


def write_atomically(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- data ---------------------------------------------------------------------------------

def training_batches(split, config, first_epoch, steps_per_epoch, soft_targets=None):
    """Batches for epochs first_epoch.. in an order fixed by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would. With a teacher's `soft_targets`, the
    targets are [one-hot labels | teacher logits], what the Distiller trains on."""
    images, labels = tf.constant(split.images), tf.one_hot(split.labels, 10)
    if soft_targets is not None:
        labels = tf.concat([labels, tf.constant(soft_targets, tf.float32)], axis=1)
    n = len(split.labels)
    # airbench's alternating flip: a random half of the images is mirrored in even epochs, the
    # other half in odd ones, so every image is seen both ways every two epochs.
    mirrored_in_even_epochs = tf.random.stateless_uniform([n], seed=[config.seed, -1]) < 0.5
    alternating_flip = config.augmentation == "crop_alternating_flip"
    mean_pixel = tf.constant(channel_stats(split.images)[0], tf.float32) if config.cutout else None

    def epoch_order(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([config.seed, epoch]))
        order = order[:steps_per_epoch * config.batch_size]
        return tf.data.Dataset.from_tensor_slices((order, tf.fill(tf.shape(order), epoch)))

    def batch(idx, epoch):
        x = tf.cast(tf.gather(images, idx), tf.float32)
        if alternating_flip:
            mirror = tf.not_equal(tf.gather(mirrored_in_even_epochs, idx), epoch % 2 == 1)
            x = tf.where(mirror[:, None, None, None], tf.reverse(x, axis=[2]), x)
        if config.cutout:
            # Batches of an epoch hold distinct images: (epoch, first image) names a batch.
            seed = tf.stack([config.seed, -2 - tf.cast(epoch[0], tf.int32) * n - idx[0]])
            x = cutout(x, config.cutout, mean_pixel, seed)
        return x, tf.gather(labels, idx)

    return (tf.data.Dataset.range(first_epoch, 1 << 30)
            .flat_map(epoch_order)
            .batch(config.batch_size, drop_remainder=True)
            .map(batch)
            .prefetch(2))


def cutout(images, size, fill, seed):
    """One size x size square per image, inside the image, set to `fill`: the network must
    recognize objects from their parts (and the square is zero once normalized)."""
    corners = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, maxval=33 - size, dtype=tf.int32)
    positions = tf.range(32)[None, :]
    rows = (positions >= corners[:, :1]) & (positions < corners[:, :1] + size)
    columns = (positions >= corners[:, 1:]) & (positions < corners[:, 1:] + size)
    square = rows[:, :, None, None] & columns[:, None, :, None]
    return tf.where(square, fill, images)


def test_batches(split, batch_size=500):
    return (tf.data.Dataset.from_tensor_slices((split.images, tf.one_hot(split.labels, 10)))
            .batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2))


# --- model --------------------------------------------------------------------------------

def learning_rate(config, steps_per_epoch):
    total = config.epochs * steps_per_epoch
    if config.schedule == "constant":
        return config.learning_rate
    if config.schedule == "step":
        boundary = (config.epochs - config.fine_tune_epochs) * steps_per_epoch
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [boundary], [config.learning_rate, config.fine_tune_lr])
    if config.schedule == "onecycle":
        return OneCycle(config.learning_rate, total, config.warmup_fraction, *config.onecycle_ends)
    raise ValueError(f"unknown schedule {config.schedule!r}")


@keras.saving.register_keras_serializable("cifar10")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from start * peak up to `peak`, then linear down to end * peak at `total_steps`."""

    def __init__(self, peak, total_steps, warmup_fraction, start=0.0, end=0.0):
        self.peak, self.total_steps, self.warmup_fraction = peak, total_steps, warmup_fraction
        self.start, self.end = start, end

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = max(1.0, self.warmup_fraction * self.total_steps)
        rise = self.start + (1 - self.start) * step / warmup
        fall = self.end + (1 - self.end) * (self.total_steps - step) / max(1.0, self.total_steps - warmup)
        return self.peak * keras.ops.clip(keras.ops.minimum(rise, fall), 0.0, 1.0)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_fraction=self.warmup_fraction,
                    start=self.start, end=self.end)


@keras.saving.register_keras_serializable("cifar10")
class BiasScaledSGD(keras.optimizers.SGD):
    """SGD whose BatchNorm biases take `bias_lr_scale` times larger steps (airbench: with their
    scales frozen, BatchNorm biases are the only per-channel knobs, and they learn slowly)."""

    def __init__(self, *args, bias_lr_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale = bias_lr_scale

    def build(self, variables):
        super().build(variables)
        self._bias_indexes = {self._get_variable_index(v) for v in variables if v.path.endswith("/beta")}

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._bias_indexes:
            learning_rate = learning_rate * self.bias_lr_scale
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead (from hlb-cifar10): from the 4th epoch on, every 5 steps the weights
    move to a slow average of themselves, whose weight grows as 0.95^5 * progress^3, and every
    epoch ends on the average."""

    PERIOD, FIRST_EPOCH = 5, 3

    def __init__(self, steps_per_epoch, total_steps, slow=None):
        super().__init__()
        self.steps_per_epoch, self.total_steps, self.slow = steps_per_epoch, total_steps, slow

    def averaged_variables(self):
        # BatchNorm's moving statistics included: airbench averages every float tensor of the net.
        return [v for v in self.model.weights if "float" in str(v.dtype)]

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        if step <= self.FIRST_EPOCH * self.steps_per_epoch:
            return
        if step % self.PERIOD == 0:
            if self.slow is None:
                self.slow = [v.numpy().copy() for v in self.averaged_variables()]
            else:
                decay = 0.95 ** self.PERIOD * (step / self.total_steps) ** 3
                self.move_to_average(decay)
        if step % self.steps_per_epoch == 0 and self.slow is not None:
            self.move_to_average(decay=1.0)

    def move_to_average(self, decay):
        for slow, variable in zip(self.slow, self.averaged_variables()):
            slow += (1 - decay) * (variable.numpy() - slow)
            variable.assign(slow)


def make_optimizer(config, steps_per_epoch):
    lr = learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if config.optimizer in ("sgd", "nesterov"):
        return BiasScaledSGD(lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov",
                             weight_decay=config.weight_decay or None, bias_lr_scale=config.bn_bias_lr_scale)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def compile_model(model, config, steps_per_epoch):
    """The model that fit() trains and checkpoints hold: `model` itself, or with a teacher the
    Distiller around it."""
    if config.teacher:
        trained = Distiller(model, config.distill_alpha, config.distill_temperature, config.label_smoothing)
        trained.compile(optimizer=make_optimizer(config, steps_per_epoch),
                        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        return trained
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model


# --- checkpoints --------------------------------------------------------------------------

def seed_states(model):
    """Augmentation/dropout RNG states: save_weights leaves them out, a faithful resume needs them."""
    return {v.path: v for v in model.variables if v.path.endswith("seed_generator_state")}


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: weights + optimizer (a new file), then state.json pointing at it
    (atomic rename), then metrics.csv. A kill at any moment leaves a consistent last epoch."""

    def __init__(self, run_dir, history, wall_time, lookahead=None, monitored="test"):
        super().__init__()
        self.run_dir, self.history, self.wall_time = Path(run_dir), history, wall_time
        self.monitored = monitored
        self.lookahead = lookahead
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.test_start = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        self.test_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        # Training time excludes the per-epoch test evaluation, which only reports progress.
        now = time.perf_counter()
        test_start = self.test_start or now
        seconds = test_start - self.epoch_start
        self.wall_time += seconds
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
               "epoch_seconds": round(seconds, 2), "wall_seconds": round(self.wall_time, 2),
               "test_seconds": round(now - test_start, 2)}
        self.history.append(row)
        weights = self.run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}.weights.h5"
        self.model.save_weights(weights)
        state = {"epoch": epoch + 1, "weights": weights.name, "wall_seconds": self.wall_time,
                 "history": self.history,
                 "seed_states": {k: np.asarray(v).tolist() for k, v in seed_states(self.model).items()}}
        saved = {weights}
        if self.lookahead and self.lookahead.slow is not None:
            slow = weights.with_name(f"epoch-{epoch + 1:04d}.lookahead.npz")
            np.savez(slow, *self.lookahead.slow)
            state["lookahead"] = slow.name
            saved.add(slow)
        write_atomically(self.run_dir / STATE, json.dumps(state))
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        for old in (self.run_dir / "checkpoints").glob("epoch-*"):
            if old not in saved:
                old.unlink()
        print(f"epoch {epoch + 1}: {seconds:.1f}s (total {self.wall_time:.0f}s) "
              f"train acc {logs['accuracy']:.4f} {self.monitored} acc {logs.get('val_accuracy', float('nan')):.4f}",
              flush=True)


def write_metrics_csv(path, history):
    rows = io.StringIO(newline="")
    writer = csv.DictWriter(rows, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomically(path, rows.getvalue())


def load_checkpoint(model, run_dir):
    """The weights and optimizer of the last completed epoch, loaded into `model`; returns the
    run's state, None for a fresh run."""
    state_path = Path(run_dir) / STATE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    model.optimizer.build(model.trainable_variables)
    model.load_weights(Path(run_dir) / "checkpoints" / state["weights"])
    return state


def restore(model, run_dir):
    """load_checkpoint, and the augmentation RNGs where the run left them: what resuming needs."""
    state = load_checkpoint(model, run_dir)
    if state is None:
        return None
    for path, variable in seed_states(model).items():
        variable.assign(state["seed_states"][path])
    return state


# What may change between runs in one directory: the epoch budget, and what only shapes evaluation
# and export, not the trained weights.
RESUMABLE_CHANGES = {"epochs", "tta", "description", "reported_accuracy", "reported_epochs"}


def check_same_config(run_dir, config):
    """A run directory belongs to one configuration, apart from RESUMABLE_CHANGES."""
    path = Path(run_dir) / "config.json"
    if path.exists():
        # Fields added since the run began count as their defaults.
        defaults = asdict(TrainConfig(name="", description=""))
        saved = {**json.loads(json.dumps(defaults)), **json.loads(path.read_text())}
        current = json.loads(json.dumps(asdict(config)))
        differing = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if differing:
            sys.exit(f"error: {run_dir} holds a run of a different configuration ({', '.join(differing)} "
                     f"differ); use another --run-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(asdict(config), indent=2))


# --- the run --------------------------------------------------------------------------------

def train(config, data, run_dir, export_base=None, train_limit=None, test_limit=None, verbose=None,
          touch_test=True):
    """Train (or resume) `config` in run_dir; returns (evaluation, per-epoch history). Without
    touch_test (a trial that chooses settings on the validation split) there is no test
    evaluation and no export, and the evaluation is None."""
    keras.utils.set_random_seed(config.seed)
    run_dir = Path(run_dir)
    check_same_config(run_dir, config)
    train_split, test_split = load_cifar10(ensure_cifar10(data))
    soft_targets = None
    if config.teacher:  # over every training image, so runs on slices can share one cache file
        soft_targets = teacher_logits(config.teacher, train_split.images, run_dir / TEACHER_LOGITS)
    if train_limit:
        train_split = train_split.take(train_limit)
        soft_targets = soft_targets[:train_limit] if soft_targets is not None else None
    if test_limit:
        test_split = test_split.take(test_limit)
    validation_split = None
    if config.validation_size:
        kept, held_out = validation_indexes(train_split.labels, config.validation_size, config.seed)
        train_split, validation_split = train_split.subset(kept), train_split.subset(held_out)
        soft_targets = soft_targets[kept] if soft_targets is not None else None
    monitored = "val" if validation_split else "test"
    if not touch_test and (validation_split is None or export_base):
        raise ValueError("a trial that leaves the test split alone needs a validation split and no export")

    steps_per_epoch = len(train_split.labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_split.labels)} training images do not fill one batch of {config.batch_size}")
    model = build_model(config, train_split.images)
    trained = compile_model(model, config, steps_per_epoch)
    state = restore(trained, run_dir)
    first_epoch = state["epoch"] if state else 0
    history = state["history"] if state else []
    if first_epoch:
        print(f"resuming {run_dir} after epoch {first_epoch}/{config.epochs}", flush=True)

    if first_epoch < config.epochs:
        print(f"training {config.name}: {len(train_split.labels)} train images, {steps_per_epoch} steps "
              f"of {config.batch_size} per epoch, {config.epochs} epochs", flush=True)
        lookahead = None
        if config.lookahead:
            slow = state.get("lookahead") if state else None
            if slow:
                with np.load(run_dir / "checkpoints" / slow) as saved:
                    slow = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            lookahead = Lookahead(steps_per_epoch, config.epochs * steps_per_epoch, slow)
        trained.fit(
            training_batches(train_split, config, first_epoch, steps_per_epoch, soft_targets),
            steps_per_epoch=steps_per_epoch, initial_epoch=first_epoch, epochs=config.epochs,
            validation_data=test_batches(validation_split or test_split), shuffle=False,
            callbacks=[*([lookahead] if lookahead else []),
                       EpochCheckpoint(run_dir, history, state["wall_seconds"] if state else 0.0, lookahead,
                                       monitored),
                       keras.callbacks.TensorBoard(run_dir / "tensorboard")],
            verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2),
        )
    plot_history(history, run_dir / "history.png", title=f"{config.name}: {config.description}",
                 monitored="validation" if validation_split else "test")
    if not touch_test:
        return None, history
    model = float32_twin(model, config, train_split.images)
    evaluation, temperature = write_evaluation(model, config, test_split, run_dir / "evaluation",
                                               dataset_label(data), validation_split)
    if export_base:
        export_once(model, config, run_dir, export_base, temperature, evaluation)
    return evaluation, history


def trained_date(run_dir):
    """The UTC date training finished: when the last epoch's checkpoint was written."""
    state = Path(run_dir) / STATE
    finished = state.stat().st_mtime if state.exists() else time.time()
    return time.strftime("%Y-%m-%d", time.gmtime(finished))


def export_once(model, config, run_dir, export_base, temperature=1.0, evaluation=None):
    """One exported version per run and test-time augmentation: re-running a finished command
    adds no version; re-running it with another --tta exports that choice as a new version."""
    record = run_dir / "export.json"
    exports = json.loads(record.read_text()) if record.exists() else {}
    if "path" in exports:  # an older record, without its TTA: taken to be the current choice
        exports = {config.tta: exports}
    if config.tta in exports:
        print(f"already exported: {exports[config.tta]['path']}")
        return
    card = build_card(asdict(config), evaluation, trained_date(run_dir)) if evaluation else None
    path = export_savedmodel(model, export_base, tta=config.tta, temperature=temperature, card=card)
    exports[config.tta] = {"path": str(path), "version": int(path.name)}
    write_atomically(record, json.dumps(exports))
    print(f"exported {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fast", choices=sorted(CONFIGS))
    parser.add_argument("--epochs", type=int, help="epoch budget (default: the configuration's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--tta", choices=TTA, help="test-time augmentation in evaluation and export "
                        "(default: the configuration's; a finished run can be re-evaluated with another)")
    parser.add_argument("--precision", choices=PRECISIONS, help="mixed_bfloat16 trains about twice as fast "
                        "on CPUs with AMX and on GPUs; evaluation and export stay float32 "
                        "(default: the configuration's)")
    parser.add_argument("--data", default="data", help="data dir, cifar-10-batches-py/ or the tarball")
    parser.add_argument("--run-dir", help="default: runs/<config>")
    parser.add_argument("--export-base", help="also export a new SavedModel version under this path")
    parser.add_argument("--validation-size", type=int, help="training images held out for monitoring and "
                        "calibration (default: the configuration's)")
    parser.add_argument("--teacher", help="distil from this exported SavedModel version (default: the configuration's)")
    parser.add_argument("--distill-alpha", type=float, help="weight of the hard-label loss when distilling")
    parser.add_argument("--distill-temperature", type=float, help="softmax temperature of the distillation loss")
    parser.add_argument("--train-limit", type=int, help="train on the first N training images only")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--deterministic", action="store_true", help="deterministic TF ops (slower)")
    parser.add_argument("--trial", action="store_true", help="choosing settings: report the validation "
                        "split only, leave the test split untouched, export nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    config = get_config(args.config, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, tta=args.tta, precision=args.precision,
                        validation_size=args.validation_size, teacher=args.teacher, distill_alpha=args.distill_alpha,
                        distill_temperature=args.distill_temperature)
    try:
        evaluation, history = train(config, args.data, args.run_dir or f"runs/{config.name}", args.export_base,
                                    args.train_limit, args.test_limit, touch_test=not args.trial)
    except (CifarDataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.trial:
        print(f"validation accuracy {history[-1]['val_accuracy']:.4f} (trial: test split not evaluated)")
        return
    print(f"test accuracy {evaluation['accuracy']:.4f} ({evaluation['dataset']})")


if __name__ == "__main__":
    main()
