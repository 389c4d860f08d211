"""Train one configuration into a run directory, resuming from its last epoch checkpoint.

    python -m training.train --config fast --data data --run-dir runs/fast [--epochs N]
        [--export-base models/cifar10]

The run directory gets: config.json, metrics.csv (one row per epoch), tensorboard/, history.png,
checkpoints/ (the last completed epoch), weights.float16.npz (the trained network, what export
needs), evaluation/ (report, confusion matrix, misclassified images) and, with --export-base, the
exported SavedModel's path in export.json. Killed at any point, the same command continues from
the last completed epoch and ends where an uninterrupted run would. The test split is only ever
evaluated, never trained on.

The same loop runs under both Keras backends: KERAS_BACKEND=tensorflow (the default) or jax.
Augmentation runs inside the compiled step (training/augment.py). Evaluation and export always go
through TensorFlow: under JAX the run ends with its weights file, and `make export RUN=<run dir>`
(python -m training.finish) evaluates and exports it on a machine with TensorFlow.
"""

import argparse
import csv
import importlib.util
import io
import itertools
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import keras
from keras import ops

from training.augment import Augmentation, Augmented
from training.configs import CONFIGS, PRECISIONS, TTA, TrainConfig, get_config
from training.data import (CifarDataError, channel_stats, dataset_label, ensure_cifar10, load_cifar10,
                           validation_indexes)
from training.distill import TEACHER_LOGITS, Distiller, teacher_logits
from training.distribute import Placement, from_environment
from training.models import WEIGHTS, build_model, save_network_weights

STATE = "state.json"


def write_atomically(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- data ---------------------------------------------------------------------------------

def training_batches(split, config, first_epoch, steps_per_epoch, soft_targets=None):
    """Batches for epochs first_epoch.. in an order fixed by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would: (inputs, targets) with inputs the raw
    uint8 pixels and, for the augmentation step (training.augment), each image's index in the
    split, the epoch and the batch number. With a teacher's `soft_targets`, the targets are
    [one-hot labels | teacher logits], what the Distiller trains on. Plain numpy: the same
    pipeline feeds TensorFlow and JAX."""
    targets = np.eye(10, dtype=np.float32)[split.labels]
    if soft_targets is not None:
        targets = np.concatenate([targets, np.asarray(soft_targets, np.float32)], axis=1)
    n, size = len(split.labels), config.batch_size
    for epoch in itertools.count(first_epoch):
        order = np.random.default_rng([config.seed, epoch]).permutation(n).astype(np.int32)
        for batch in range(steps_per_epoch):
            index = order[batch * size:(batch + 1) * size]
            yield ({"pixels": split.images[index], "index": index, "epoch": np.full(size, epoch, np.int32),
                    "batch": np.full(size, batch, np.int32)}, targets[index])


def test_data(split):
    """(uint8 pixels, one-hot labels): the network casts them, unaugmented."""
    return split.images, np.eye(10, dtype=np.float32)[split.labels]


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
    scales frozen, BatchNorm biases are the only per-channel knobs, and they learn slowly), and
    whose whitening stem's bias, with `whiten_bias_steps`, stops after that many steps: no
    gradient, momentum or decay from then on, as when airbench sets requires_grad=False."""

    def __init__(self, *args, bias_lr_scale=1.0, whiten_bias_steps=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale, self.whiten_bias_steps = bias_lr_scale, whiten_bias_steps

    def build(self, variables):
        super().build(variables)
        self._bias_indexes = {self._get_variable_index(v) for v in variables if v.path.endswith("/beta")}
        self._whiten_bias_indexes = (set() if self.whiten_bias_steps is None else
                                     {self._get_variable_index(v) for v in variables
                                      if v.path.endswith("whiten/bias")})

    def _learns(self, variable):
        """For the whitening bias, 1 while it learns and then 0 (a tensor: the step compiles once);
        None for every other variable."""
        if self._get_variable_index(variable) not in self._whiten_bias_indexes:
            return None
        return ops.cast(self.iterations < self.whiten_bias_steps, variable.dtype)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        if index in self._bias_indexes:
            learning_rate = learning_rate * self.bias_lr_scale
        learns = self._learns(variable)
        if learns is not None:
            gradient = gradient * learns
            if self.momentums:
                self.assign(self.momentums[index], self.momentums[index] * learns)
        super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                decay = ops.cast(self.learning_rate, variable.dtype) * ops.cast(self.weight_decay, variable.dtype)
                learns = self._learns(variable)
                variable.assign(variable - variable * (decay if learns is None else decay * learns))

    def get_config(self):
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale,
                "whiten_bias_steps": self.whiten_bias_steps}


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead (from hlb-cifar10): from the 4th epoch on, every 5 steps the weights
    move to a slow average of themselves, whose weight grows as 0.95^5 * progress^3, and every
    epoch ends on the average. The average stays a backend tensor on the training device, and the
    model is only touched on the steps that average (under JAX, touching it syncs its state)."""

    PERIOD, FIRST_EPOCH = 5, 3

    def __init__(self, steps_per_epoch, total_steps, slow=None):
        super().__init__()
        self.steps_per_epoch, self.total_steps, self.epoch = steps_per_epoch, total_steps, 0
        self.slow = None if slow is None else [ops.convert_to_tensor(s) for s in slow]

    def averaged_variables(self):
        # BatchNorm's moving statistics included: airbench averages every float tensor of the net.
        return [v for v in self.model.weights if "float" in str(v.dtype)]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * self.steps_per_epoch + batch + 1  # = optimizer.iterations, without a sync
        if step <= self.FIRST_EPOCH * self.steps_per_epoch:
            return
        if step % self.PERIOD == 0:
            if self.slow is None:
                self.slow = [ops.copy(v.value) for v in self.averaged_variables()]
            else:
                decay = 0.95 ** self.PERIOD * (step / self.total_steps) ** 3
                self.move_to_average(decay)
        if step % self.steps_per_epoch == 0 and self.slow is not None:
            self.move_to_average(decay=1.0)

    def move_to_average(self, decay):
        variables = self.averaged_variables()
        self.slow = [slow + (1 - decay) * (variable.value - slow) for slow, variable in zip(self.slow, variables)]
        for slow, variable in zip(self.slow, variables):
            # A copy: under JAX the next step donates the variables' buffers, which must not be the average's.
            variable.assign(ops.copy(slow))

    def slow_arrays(self):
        return [np.asarray(ops.convert_to_numpy(s)) for s in self.slow]


def make_optimizer(config, steps_per_epoch):
    lr = learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if config.optimizer in ("sgd", "nesterov"):
        frozen = None if config.whiten_bias_epochs is None else config.whiten_bias_epochs * steps_per_epoch
        return BiasScaledSGD(lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov",
                             weight_decay=config.weight_decay or None, bias_lr_scale=config.bn_bias_lr_scale,
                             whiten_bias_steps=frozen)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def jit_compile():
    """Whether XLA compiles the whole training step (it can: augmentation is part of it). Under
    JAX always; under TensorFlow where a GPU is visible, which is Keras' own "auto" choice: on
    CPUs, TensorFlow's oneDNN kernels outrun XLA's (measured in the README), and with op
    determinism (--deterministic) Keras refuses XLA."""
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf
    from tensorflow.python.framework.config import is_op_determinism_enabled
    return bool(tf.config.list_physical_devices("GPU")) and not is_op_determinism_enabled()


def compile_model(model, config, steps_per_epoch, augmentation=None, jit=None):
    """The model that fit() trains and checkpoints hold: `model` behind the augmentation step
    (training.augment.Augmented), or with a teacher the Distiller, which is one too. `jit`:
    XLA or not (default: jit_compile())."""
    if config.teacher:
        trained = Distiller(model, config.distill_alpha, config.distill_temperature, config.label_smoothing,
                            augmentation)
        loss = None
    else:
        trained = Augmented(model, augmentation)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    trained.compile(optimizer=make_optimizer(config, steps_per_epoch), loss=loss,
                    metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                    jit_compile=jit_compile() if jit is None else jit)
    return trained


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
                 "seed_states": {k: np.asarray(v).tolist() for k, v in seed_states(self.model).items()},
                 "backend": keras.backend.backend()}
        saved = {weights}
        if self.lookahead and self.lookahead.slow is not None:
            slow = weights.with_name(f"epoch-{epoch + 1:04d}.lookahead.npz")
            np.savez(slow, *self.lookahead.slow_arrays())
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

def load_splits(config, data, train_limit=None, test_limit=None):
    """The images a run trains on, monitors and is tested on: `train`, `validation` (None without
    a validation_size), `test`, `kept` (the indexes of `train` among the first train_limit
    training images) and `all_train_images` (every training image: what a teacher labels)."""
    train_split, test_split = load_cifar10(ensure_cifar10(data))
    all_train_images = train_split.images
    if train_limit:
        train_split = train_split.take(train_limit)
    if test_limit:
        test_split = test_split.take(test_limit)
    kept, validation_split = np.arange(len(train_split.labels)), None
    if config.validation_size:
        kept, held_out = validation_indexes(train_split.labels, config.validation_size, config.seed)
        train_split, validation_split = train_split.subset(kept), train_split.subset(held_out)
    return SimpleNamespace(train=train_split, validation=validation_split, test=test_split, kept=kept,
                           all_train_images=all_train_images)


def train(config, data, run_dir, export_base=None, train_limit=None, test_limit=None, verbose=None,
          touch_test=True, placement=None):
    """Train (or resume) `config` in run_dir; returns (evaluation, per-epoch history). Without
    touch_test (a trial that chooses settings on the validation split) there is no test
    evaluation and no export, and the evaluation is None. Under a backend other than TensorFlow
    the evaluation is None too: the run ends with its weights file, for `make export`. With a
    `placement` (training.distribute) of several replicas, config.batch_size is the global batch;
    a worker other than the chief trains along without writing run_dir and returns (None, history)."""
    keras.utils.set_random_seed(config.seed)
    placement = placement or Placement(keras.backend.backend())
    run_dir = placement.write_dir(run_dir)  # the chief's run_dir; another worker's private copy
    backend = keras.backend.backend()
    if export_base and backend != "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        raise ValueError(f"export goes through TensorFlow, which is not installed here: train without "
                         f"--export-base, then `make export RUN={run_dir}` where it is")
    check_same_config(run_dir, config)
    splits = load_splits(config, data, train_limit, test_limit)
    train_split, validation_split, test_split = splits.train, splits.validation, splits.test
    soft_targets = None
    if config.teacher:  # over every training image, so runs on slices can share one cache file
        soft_targets = teacher_logits(config.teacher, splits.all_train_images, run_dir / TEACHER_LOGITS)[splits.kept]
    monitored = "val" if validation_split else "test"
    if not touch_test and (validation_split is None or export_base):
        raise ValueError("a trial that leaves the test split alone needs a validation split and no export")

    steps_per_epoch = len(train_split.labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_split.labels)} training images do not fill one batch of {config.batch_size}")
    with placement.scope():
        model = build_model(config, train_split.images)
        placement.prepare(model, config)
        trained = placement.adapt(compile_model(model, config, steps_per_epoch, Augmentation(config, train_split.images)))
        state = restore(trained, run_dir)
    first_epoch = state["epoch"] if state else 0
    history = state["history"] if state else []
    if first_epoch:
        print(f"resuming {run_dir} after epoch {first_epoch}/{config.epochs}", flush=True)

    if first_epoch < config.epochs:
        print(f"training {config.name} under {backend}: {len(train_split.labels)} train images, {steps_per_epoch} "
              f"steps of {config.batch_size} per epoch, {config.epochs} epochs", flush=True)
        lookahead = None
        if config.lookahead:
            slow = state.get("lookahead") if state else None
            if slow:
                with np.load(run_dir / "checkpoints" / slow) as saved:
                    slow = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            lookahead = Lookahead(steps_per_epoch, config.epochs * steps_per_epoch, slow)
        # TensorBoard's writer is TensorFlow's: under JAX, metrics.csv and history.png say the same.
        board = [keras.callbacks.TensorBoard(run_dir / "tensorboard")] if backend == "tensorflow" else []
        trained.fit(
            training_batches(train_split, config, first_epoch, steps_per_epoch, soft_targets),
            steps_per_epoch=steps_per_epoch, initial_epoch=first_epoch, epochs=config.epochs,
            validation_data=test_data(validation_split or test_split), validation_batch_size=500, shuffle=False,
            callbacks=[*([lookahead] if lookahead else []),
                       EpochCheckpoint(run_dir, history, state["wall_seconds"] if state else 0.0, lookahead,
                                       monitored),
                       *board],
            verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2),
        )
    if not placement.chief:
        return None, history
    mean, std = channel_stats(train_split.images)
    save_network_weights(model, run_dir / WEIGHTS, {
        "backend": backend, "config": config.name, "epoch": history[-1]["epoch"] if history else 0,
        "train_limit": train_limit, "test_limit": test_limit, "mean": mean.tolist(), "std": std.tolist()})
    draw_history(run_dir, config, history)
    if not touch_test:
        return None, history
    if backend != "tensorflow":
        if not export_base:
            print(f"trained under {backend}; evaluate and export with TensorFlow: make export RUN={run_dir}")
            return None, history
        return finish_in_tensorflow(run_dir, data, export_base, config.tta), history
    from training.finish import finish_run  # TensorFlow's side: evaluation through the export's function
    return finish_run(config, run_dir, splits, dataset_label(data), export_base), history


def draw_history(run_dir, config, history):
    """history.png, where matplotlib is installed (a bare JAX machine may lack it: then `make
    export` draws it from state.json)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no history.png (make export draws it)")
        return
    from training.plots import plot_history
    plot_history(history, Path(run_dir) / "history.png", title=f"{config.name}: {config.description}",
                 monitored="validation" if config.validation_size else "test")


def finish_in_tensorflow(run_dir, data, export_base, tta):
    """Evaluation and export of a run trained under another backend, by training.finish in a
    TensorFlow process (a process has one Keras backend); returns the evaluation."""
    import subprocess
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    subprocess.run([sys.executable, "-m", "training.finish", str(run_dir), "--data", str(data),
                    "--export-base", str(export_base), "--tta", tta], env=env, check=True)
    return json.loads((Path(run_dir) / "evaluation" / "evaluation.json").read_text())


def trained_date(run_dir):
    """The UTC date training finished: when the last epoch's checkpoint was written."""
    state = Path(run_dir) / STATE
    finished = state.stat().st_mtime if state.exists() else time.time()
    return time.strftime("%Y-%m-%d", time.gmtime(finished))


def export_once(model, config, run_dir, export_base, temperature=1.0, evaluation=None, ood=None):
    """One exported version per run and test-time augmentation: re-running a finished command
    adds no version; re-running it with another --tta exports that choice as a new version. `ood`:
    the out-of-distribution head it folds in (training.ood.OodHead)."""
    record = run_dir / "export.json"
    exports = json.loads(record.read_text()) if record.exists() else {}
    if "path" in exports:  # an older record, without its TTA: taken to be the current choice
        exports = {config.tta: exports}
    if config.tta in exports:
        print(f"already exported: {exports[config.tta]['path']}")
        return
    from training.card import build_card  # TensorFlow's side, like the export
    card = build_card(asdict(config), evaluation, trained_date(run_dir), ood=ood) if evaluation else None
    from training.export import export_savedmodel
    path = export_savedmodel(model, export_base, tta=config.tta, temperature=temperature, card=card, ood=ood)
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
    if args.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # XLA on the CPU, JAX's backend here, is deterministic as it is
        tf.config.experimental.enable_op_determinism()
    config = get_config(args.config, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, tta=args.tta, precision=args.precision,
                        validation_size=args.validation_size, teacher=args.teacher, distill_alpha=args.distill_alpha,
                        distill_temperature=args.distill_temperature)
    try:
        placement = from_environment()  # several GPUs, or TF_CONFIG's workers: one run over all of them
        print(f"placement: {placement.describe()}", flush=True)
        evaluation, history = train(config, args.data, args.run_dir or f"runs/{config.name}", args.export_base,
                                    args.train_limit, args.test_limit, touch_test=not args.trial, placement=placement)
    except (CifarDataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.trial:
        print(f"validation accuracy {history[-1]['val_accuracy']:.4f} (trial: test split not evaluated)")
        return
    if evaluation is None:
        print(f"last epoch: {history[-1]['val_accuracy']:.4f} {'validation' if config.validation_size else 'test'} "
              f"accuracy without test-time augmentation" if history else "no epoch trained")
        return
    print(f"test accuracy {evaluation['accuracy']:.4f} ({evaluation['dataset']})")


if __name__ == "__main__":
    main()
