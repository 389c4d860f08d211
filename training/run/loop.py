"""The training loop: a configuration's data, network and optimizer, fit() epoch by epoch into a
run directory, resumed from its last checkpoint; under TensorFlow or JAX, on one device or several
(training.run.distribute). It ends with the trained network's weights file; evaluation and export
are training.ship's (training/train.py runs both)."""

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import keras

from training.recipe.augment import Augmentation
from training.recipe.data import CLASS_NAMES, channel_stats, ensure_cifar10, load_cifar10, validation_indexes
from training.recipe.images import load_image_folder
from training.recipe.models import WEIGHTS, build_model, save_network_weights
from training.run.checkpoints import EpochCheckpoint, check_same_config, restore
from training.run.distill import TEACHER_LOGITS, teacher_logits
from training.run.distribute import Placement
from training.run.history import draw_history
from training.run.optimizers import Lookahead, compile_model


def training_batches(split, config, first_epoch, steps_per_epoch, soft_targets=None, exposure=None):
    """Batches for epochs first_epoch.. in an order fixed by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would: (inputs, targets) with inputs the raw
    uint8 pixels and, for the augmentation step (training.recipe.augment), each image's index in the
    split, the epoch and the batch number. With a teacher's `soft_targets`, the targets are
    [one-hot labels | teacher logits], what the Distiller trains on. With `exposure` (uint8
    images and their labels, -1 for an outlier: none of the ten classes), config.outlier_batch of
    them join every batch, an outlier's targets all zeros and a photo's its one-hot label (and no
    teacher logits), shuffled among the training images so that every replica of a distributed
    step gets its share. Plain numpy: the same pipeline feeds TensorFlow and JAX."""
    targets = np.eye(10, dtype=np.float32)[split.labels]
    if soft_targets is not None:
        targets = np.concatenate([targets, np.asarray(soft_targets, np.float32)], axis=1)
    n, size = len(split.labels), config.batch_size
    extra = config.outlier_batch if exposure is not None else 0
    if extra:
        images, labels = exposure
        exposure_targets = np.zeros((len(labels), targets.shape[1]), np.float32)
        exposure_targets[labels >= 0, labels[labels >= 0]] = 1
    for epoch in itertools.count(first_epoch):
        order = np.random.default_rng([config.seed, epoch]).permutation(n).astype(np.int32)
        if extra:
            exposure_order = np.random.default_rng([config.seed, epoch, 1]).permutation(len(labels))
        for batch in range(steps_per_epoch):
            index = order[batch * size:(batch + 1) * size]
            pixels, batch_targets = split.images[index], targets[index]
            if extra:
                picked = exposure_order[(batch * extra + np.arange(extra)) % len(labels)]
                mixed = np.random.default_rng([config.seed, epoch, batch, 1]).permutation(size + extra)
                pixels = np.concatenate([pixels, images[picked]])[mixed]
                batch_targets = np.concatenate([batch_targets, exposure_targets[picked]])[mixed]
                index = np.concatenate([index, (picked % n).astype(np.int32)])[mixed]  # any index: it picks a flip
            yield ({"pixels": pixels, "index": index, "epoch": np.full(size + extra, epoch, np.int32),
                    "batch": np.full(size + extra, batch, np.int32)}, batch_targets)


def load_exposure(config):
    """config.outliers' images (label -1) and config.outlier_photos' (labelled by their class
    folder), as the worker preprocesses an upload; or None."""
    if not config.outliers:
        return None
    outliers, _ = load_image_folder(config.outliers)
    if len(outliers) == 0:
        raise ValueError(f"no image files under {config.outliers} (outliers): python -m training.lab.ood_sets")
    if config.outlier_batch <= 0:
        raise ValueError("outliers need an outlier_batch: how many join every training batch")
    photos, names = (load_image_folder(config.outlier_photos) if config.outlier_photos
                     else (outliers[:0], []))
    folders = [Path(name).parts[0] for name in names]
    unknown = sorted(set(folders) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"{config.outlier_photos}: folders must be class names, not {', '.join(unknown)}")
    labels = np.array([-1] * len(outliers) + [CLASS_NAMES.index(folder) for folder in folders], np.int64)
    print(f"outlier exposure: {len(outliers)} images from {config.outliers}"
          f"{f', {len(photos)} labelled photos from {config.outlier_photos}' if len(photos) else ''}, "
          f"{config.outlier_batch} in every batch, weight {config.outlier_weight}", flush=True)
    return np.concatenate([outliers, photos]), labels


def test_data(split):
    """(uint8 pixels, one-hot labels): the network casts them, unaugmented."""
    return split.images, np.eye(10, dtype=np.float32)[split.labels]


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


def fit(config, data, run_dir, train_limit=None, test_limit=None, verbose=None, placement=None):
    """Train (or resume) `config` in run_dir, epoch by epoch, to the end of its epochs; returns
    (splits, per-epoch history, run_dir), run_dir None on a worker other than the chief. The
    chief's run directory then holds the trained network's weights file (training.recipe.models)
    and history.png. With a `placement` (training.run.distribute) of several replicas,
    config.batch_size is the global batch; the other workers train along in a private copy."""
    keras.utils.set_random_seed(config.seed)
    placement = placement or Placement(keras.backend.backend())
    run_dir = placement.write_dir(run_dir)  # the chief's run_dir; another worker's private copy
    backend = keras.backend.backend()
    check_same_config(run_dir, config)
    splits = load_splits(config, data, train_limit, test_limit)
    train_split, validation_split, test_split = splits.train, splits.validation, splits.test
    soft_targets = None
    if config.teacher:  # over every training image, so runs on slices can share one cache file
        soft_targets = teacher_logits(config.teacher, splits.all_train_images, run_dir / TEACHER_LOGITS)[splits.kept]
    exposure = load_exposure(config)
    monitored = "val" if validation_split else "test"

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
            training_batches(train_split, config, first_epoch, steps_per_epoch, soft_targets, exposure),
            steps_per_epoch=steps_per_epoch, initial_epoch=first_epoch, epochs=config.epochs,
            validation_data=test_data(validation_split or test_split), validation_batch_size=500, shuffle=False,
            callbacks=[*([lookahead] if lookahead else []),
                       EpochCheckpoint(run_dir, history, state["wall_seconds"] if state else 0.0, lookahead,
                                       monitored),
                       *board],
            verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2),
        )
    if not placement.chief:
        return splits, history, None
    mean, std = channel_stats(train_split.images)
    save_network_weights(model, run_dir / WEIGHTS, {
        "backend": backend, "config": config.name, "epoch": history[-1]["epoch"] if history else 0,
        "train_limit": train_limit, "test_limit": test_limit, "mean": mean.tolist(), "std": std.tolist()})
    draw_history(run_dir, config, history)
    return splits, history, run_dir
