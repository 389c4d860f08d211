"""Export a trained model as a SavedModel that TensorFlow Serving loads.

Contract (the worker depends on it): signature `serving_default`, input `images` uint8
[N, 32, 32, 3] RGB; outputs `probabilities` float32 [N, 10] (softmax) and `classes` string
[N, 10] (class names in the order of the probabilities; the batch dimension is kept so TF
Serving's server-side batching can split the outputs); since the out-of-distribution head
(training/ship/ood.py), optionally both `ood_score` float32 [N] and `in_distribution` bool [N]. All preprocessing is inside the graph.
Kernels are stored in float16 and computed in float32 (see Float16Kernels); evaluation goes
through the same function, so it measures the served numbers. A second signature, `model_card`
(no input, output `card`: a JSON string), carries the model card (training/ship/card.py).

Layout: `<base_path>/<integer version>/`, written to a hidden temporary directory first and
renamed into place, so a server polling base_path never sees a half-written version.
"""

import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf
import keras

from training.recipe.configs import TTA
from training.recipe.contract import INPUT, SIGNATURE, probabilities_in_batches
from training.recipe.data import CLASS_NAMES
from training.recipe.models import averaged_logits
from training.ship.ood import with_features



def existing_versions(base_path):
    base = Path(base_path)
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []


def next_version(base_path):
    versions = existing_versions(base_path)
    return versions[-1] + 1 if versions else 1



class Float16Kernels(tf.Module):
    """The model's weights with conv and dense kernels rounded to float16, computing in float32.

    Kernels are nearly all of the weights, so the SavedModel is half the size (the default model
    fits in a git repository); the rounding moves probabilities by about 1e-4, far less than
    the bfloat16 arithmetic a model may have trained in. Normalization statistics, biases and
    BatchNorm statistics stay float32."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.trainable = [self._stored(v) for v in model.trainable_variables]
        self.non_trainable = [self._stored(v) for v in model.non_trainable_variables]

    @staticmethod
    def _stored(variable):
        value = tf.cast(variable, tf.float16) if variable.path.endswith("/kernel") else variable.value
        return tf.Variable(value, trainable=False)

    def __call__(self, pixels, training=False):
        def computed(stored, variables):
            return [tf.cast(s, v.dtype) for s, v in zip(stored, variables)]
        outputs, _ = self.model.stateless_call(computed(self.trainable, self.model.trainable_variables),
                                               computed(self.non_trainable, self.model.non_trainable_variables),
                                               pixels, training=training)
        return outputs


def serving_function(model, tta, temperature=1.0, ood=None):
    """uint8 images -> probabilities (softmax of the TTA-averaged logits / temperature) and
    class names. The temperature, fitted on held-out images, makes the probabilities calibrated.
    With an `ood` head (training.ship.ood.OodHead), also each image's `ood_score` (from its features
    and calibrated logits, one view) and `in_distribution` (the score at most the head's threshold)."""
    if tta not in TTA:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose from {', '.join(TTA)}")
    classes = tf.constant(CLASS_NAMES)
    stored = Float16Kernels(model if ood is None else with_features(model, ood.scorer.blocks))

    def logits_of(pixels, training=False):
        outputs = stored(pixels, training)
        return outputs if ood is None else outputs[1]

    def serve(images):
        pixels = tf.cast(images, tf.float32)
        batch = tf.shape(images)[0]
        if ood is None:
            logits = averaged_logits(logits_of, pixels, tta) / temperature
        else:  # the first view's features and logits in one pass
            features, first = stored(pixels)
            logits = averaged_logits(logits_of, pixels, tta, first=first) / temperature
        outputs = {"probabilities": tf.nn.softmax(logits), "classes": tf.tile(classes[tf.newaxis], [batch, 1])}
        if ood is not None:
            score = ood.scorer.score(features, logits, keras.ops)
            outputs.update(ood_score=score, in_distribution=score <= ood.threshold)
        return outputs
    return serve


def write_version(base_path, write, version=None):
    """Run `write(directory)` into a hidden staging directory under base_path, then rename it to
    version `version` (default: the next integer), so a server polling base_path never loads half
    a model."""
    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    version = version or next_version(base)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"{final} exists: versions are immutable, pick a new one")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))  # not an integer: servers skip it
    try:
        write(str(staging))
        os.chmod(staging, 0o755)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def serving_archive(model, tta="none", temperature=1.0, ood=None):
    """The `serving_default` endpoint of `model`, ready to write out (ExportArchive.write_out)."""
    # Not archive.track(model): the endpoint tracks the variables it uses, and tracking the model
    # as well stores every weight twice.
    archive = keras.export.ExportArchive()
    archive.add_endpoint(SIGNATURE, serving_function(model, tta, temperature, ood),
                         input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name=INPUT)])
    return archive


def export_savedmodel(model, base_path, version=None, tta="none", temperature=1.0, ood=None):
    """Write `model` as version `version` (default: the next integer) under base_path. With an
    `ood` head, it also answers `ood_score` and `in_distribution` (serving_function). A version
    with its model card: training.ship.card.export_with_card."""
    archive = serving_archive(model, tta, temperature, ood)
    return write_version(base_path, lambda path: archive.write_out(path, verbose=False), version)


def predict_keras(model, images, tta, batch_size=500, temperature=1.0):
    """Probabilities from the Keras model through the very function the export serves."""
    return probabilities_in_batches(tf.function(serving_function(model, tta, temperature)), images, batch_size)
