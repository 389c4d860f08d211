"""The serving contract, read: a SavedModel version's `serving_default` signature takes `images`,
uint8 [N, 32, 32, 3] RGB, and answers `probabilities` [N, 10] (training.ship.export writes it);
what a teacher's or an evaluation's predictions go through."""

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

SIGNATURE = "serving_default"
INPUT = "images"


def probabilities_in_batches(serve, images, batch_size=500, progress=None):
    """Run a serving function (exported or not) over uint8 images, batch by batch; `progress`, if
    given, is called with the number of images done after each batch."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(serve(**{INPUT: tf.constant(images[i:i + batch_size])})["probabilities"].numpy())
        if progress:
            progress(i + len(out[-1]))
    return np.concatenate(out)


def predict_exported(export_dir, images, batch_size=500, progress=None):
    """Probabilities from the exported SavedModel for uint8 images."""
    serve = tf.saved_model.load(str(export_dir)).signatures[SIGNATURE]
    return probabilities_in_batches(serve, images, batch_size, progress)


def served_temperature(export_dir):
    """The softmax temperature a version divides its logits by (its model card's; 1 without one)."""
    card = Path(export_dir) / "assets.extra" / "model_card.json"
    return json.loads(card.read_text())["training"].get("temperature", 1.0) if card.is_file() else 1.0
