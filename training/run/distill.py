"""Knowledge distillation (Hinton et al. 2015): a small student learns from a strong teacher's
soft targets as well as from the labels, so serving cost moves into training time.

The teacher is an exported SavedModel version (a single run, a TTA export, an ensemble: what it
serves is what the student learns from), or a finished run directory, whose network is rebuilt by
the current backend and averaged over the run's TTA views: a GPU machine with JAX and no
TensorFlow trains a teacher and then its student (training/lab/gpu_session.sh). Its outputs over the
un-augmented training images are
computed once and cached in the run directory; the student then sees them under every crop, flip
and cutout of that image (on 2 CPU cores a teacher pass per training step would cost more than
the student's whole step).

    python -m training.run.distill models/cifar10/3 --data data --out runs/student/teacher-logits.npz
    python -m training.run.distill runs/default_gpu --data data --out runs/student_gpu/teacher-logits.npz
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import keras
from keras import ops

from training.recipe.augment import Augmented
from training.recipe.data import load_cifar10
from training.recipe.models import WEIGHTS, averaged_logits, log_probabilities

TEACHER_LOGITS = "teacher-logits.npz"


def fingerprint(teacher_dir, images):
    """Names the teacher version and the images: a cache made for others is not reused."""
    digest = hashlib.sha256()
    teacher_files = ([Path(teacher_dir) / name for name in (WEIGHTS, "config.json")] if is_run_directory(teacher_dir)
                     else Path(teacher_dir).rglob("*"))
    for path in sorted(teacher_files):
        if path.is_file():
            digest.update(path.relative_to(teacher_dir).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(images.tobytes())
    digest.update(b"uncalibrated")  # caches of the calibrated targets, which taught worse, are not reused
    return digest.hexdigest()


def is_run_directory(teacher):
    return (Path(teacher) / WEIGHTS).is_file()


def run_probabilities(run_dir, images, batch_size, progress):
    """A finished run's softmax over its TTA views, computed by the current backend, normalizing
    with the statistics of the images it trained on."""
    from training.run.rundir import network_from_run, saved_config
    config = saved_config(run_dir)
    model, _ = network_from_run(config, run_dir, images, own_statistics=True)
    pixels = keras.Input((32, 32, 3))
    served = keras.Model(pixels, ops.softmax(averaged_logits(model, pixels, config.tta)))

    class Progress(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            progress(min((batch + 1) * batch_size, len(images)))
    return served.predict(images.astype("float32"), batch_size=batch_size, verbose=0, callbacks=[Progress()])


def compute_teacher_logits(teacher_dir, images, batch_size=1000):
    """The teacher's logits before calibration, up to a per-image constant, which no softmax sees:
    the log of its probabilities, times the temperature an exported version divides its logits by.
    A calibrated teacher (T = 0.52 for models/cifar10/3) is twice as sharp as its network:
    students taught those targets fell from 70-78% held-out accuracy to 34-47% in the 4th of 40
    epochs while their training accuracy rose (training/results/student/trials.md)."""
    started = time.perf_counter()

    def progress(done):
        rate = done / (time.perf_counter() - started)
        print(f"\rteacher {teacher_dir}: {done}/{len(images)} images, {rate:.0f}/s, "
              f"{(len(images) - done) / rate / 60:.1f} min left", end="", file=sys.stderr, flush=True)
    temperature = 1.0
    if is_run_directory(teacher_dir):
        probabilities = run_probabilities(teacher_dir, images, batch_size, progress)
    else:
        from training.recipe.contract import predict_exported, served_temperature
        probabilities = predict_exported(teacher_dir, images, batch_size, progress)
        temperature = served_temperature(teacher_dir)
    print(file=sys.stderr)
    return (log_probabilities(probabilities) * temperature).astype(np.float32)


def teacher_logits(teacher_dir, images, cache):
    """The teacher's logits for `images`, from `cache` when it was made by this teacher for
    these images, else computed and cached."""
    key = fingerprint(teacher_dir, images)
    cache = Path(cache)
    if cache.is_file():
        with np.load(cache) as saved:
            if str(saved["fingerprint"]) == key:
                return saved["logits"]
    logits = compute_teacher_logits(teacher_dir, images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.partial.npz")
    np.savez(partial, logits=logits, fingerprint=key)
    partial.replace(cache)
    return logits


class Distiller(Augmented):
    """Trains `student` on alpha * cross-entropy(labels) + (1 - alpha) * T^2 * KL(teacher_T ||
    student_T), where _T is a softmax at temperature T (keras-io's knowledge distillation, with
    the teacher's logits arriving beside the labels: y = [one-hot labels | teacher logits]).
    Batches with labels only (validation), and rows with a label and no teacher logits (photos
    from outside CIFAR-10), are scored on the labels alone. Rows without a label (all zeros) are
    outliers, images of none of the ten classes: they add outlier_weight times their cross-entropy
    to the uniform distribution (outlier exposure, Hendrycks et al. 2019), so the network learns
    to be unsure of what it was not trained on; labels, teacher and metrics see the other rows. Like any trained model here, the student sees its batches through the
    augmentation step (training.recipe.augment)."""

    def __init__(self, student, alpha, temperature, label_smoothing=0.0, augmentation=None, outlier_weight=0.0,
                 **kwargs):
        super().__init__(student, augmentation, **kwargs)
        self.alpha, self.temperature, self.outlier_weight = alpha, temperature, outlier_weight
        self.hard_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing,
                                                              reduction=None)

    @property
    def student(self):
        return self.network

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        labels, logits = y[:, :10], ops.cast(y_pred, "float32")
        labelled = labelled_rows(labels)
        per_row = ops.cast(self.hard_loss(labels, y_pred), "float32")
        if y.shape[-1] == 20:
            t = self.temperature
            teacher = ops.softmax(y[:, 10:] / t, axis=-1)
            student = ops.log_softmax(logits / t, axis=-1)
            soft = ops.sum(teacher * (ops.log(ops.maximum(teacher, 1e-30)) - student), axis=-1)
            # Photos from outside CIFAR-10 come with labels and no teacher logits: the labels alone.
            taught = ops.cast(ops.any(ops.not_equal(y[:, 10:], 0), axis=-1), "float32")
            per_row = per_row + taught * ((self.alpha - 1) * per_row + (1 - self.alpha) * t ** 2 * soft)
        loss = masked_mean(per_row, labelled)
        if self.outlier_weight:
            to_uniform = -ops.mean(ops.log_softmax(logits, axis=-1), axis=-1)
            loss = loss + self.outlier_weight * masked_mean(to_uniform, 1 - labelled)
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels = y[:, :10]
        return super().compute_metrics(x, labels, y_pred, labelled_rows(labels))


def labelled_rows(labels):
    """1 for a row with a label, 0 for an outlier's (all zeros)."""
    return ops.cast(ops.sum(labels, axis=-1) > 0, "float32")


def masked_mean(values, weights):
    return ops.sum(ops.cast(values, "float32") * weights) / ops.maximum(ops.sum(weights), 1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="an exported SavedModel version directory")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", required=True, help=f"cache file, e.g. runs/<run>/{TEACHER_LOGITS}")
    args = parser.parse_args(argv)
    train, _ = load_cifar10(args.data)
    logits = teacher_logits(args.teacher, train.images, args.out)
    accuracy = (logits.argmax(axis=1) == train.labels).mean()
    print(f"{args.out}: {len(logits)} images, teacher accuracy on them {accuracy:.4f}")


if __name__ == "__main__":
    main()
