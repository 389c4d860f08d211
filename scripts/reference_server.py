"""The yardstick `make bench-serve` measures the stack against: the original project's serving app.

As the seed's rest_api/app.py is built (TheKermitFrog/cifar10-CNN): one threaded Flask process;
the model is a Keras Sequential network with the seed's final layer list (three VGG blocks of two
3x3 convs with ReLU then BatchNorm, max-pool and dropout; Flatten, Dense 128, BatchNorm, Dropout,
softmax), compiled with Adam, saved to an .h5 file and read back with `keras.models.load_model`;
each request's image is opened with Pillow, converted to RGB if it is not, resized to 32x32 with
Pillow's default filter, turned into an array, normalized with the seed's training mean and std,
and classified by `model.predict` on its own. Its weights are untrained (the seed's .h5 is not
published): only the cost is compared, not the answers.

    python -m scripts.reference_server --port 5099
"""
import argparse
import io
import logging
import tempfile
from pathlib import Path

import keras
import numpy as np
from flask import Flask, jsonify, request
from keras import layers, regularizers
from PIL import Image

from training.recipe.data import CLASS_NAMES

SEED_MEAN, SEED_STD = 120.70756512369792, 64.06097012299574  # rest_api/app.py's normalization


def seed_final_model() -> keras.Sequential:
    """The seed's build_model_VGG3_final: its layer list, in its order."""
    l2 = dict(kernel_regularizer=regularizers.l2(1e-4))
    model = keras.Sequential([keras.Input((32, 32, 3))])
    for filters, dropout in ((32, 0.2), (64, 0.3), (128, 0.4)):
        for _ in range(2):
            model.add(layers.Conv2D(filters, 3, padding="same", activation="relu", **l2))
            model.add(layers.BatchNormalization())
        model.add(layers.MaxPooling2D(2))
        model.add(layers.Dropout(dropout))
    model.add(layers.Flatten())
    model.add(layers.Dense(128, activation="relu", **l2))
    model.add(layers.BatchNormalization())
    model.add(layers.Dropout(0.5))
    model.add(layers.Dense(10, activation="softmax"))
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(3e-4), metrics=["accuracy"])
    return model


def load_seed_model() -> keras.Model:
    """The seed's network as its app gets it: from an .h5 file, through keras.models.load_model."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cifar10_model.h5"
        seed_final_model().save(path)
        return keras.models.load_model(path)


def prepare_image(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.expand_dims(keras.utils.img_to_array(image.resize((32, 32))), axis=0)
    return (pixels.astype("float32") - SEED_MEAN) / (SEED_STD + 1e-9)


def create_app():
    model = load_seed_model()
    model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        data = {"success": False}
        if not request.files.get("image"):
            return jsonify(data), 400
        try:
            image = Image.open(io.BytesIO(request.files["image"].read()))
            pixels = prepare_image(image)
        except Exception:  # the seed's app had no error handling; a bad upload is a 400 here
            return jsonify(data), 400
        probabilities = model.predict(pixels, verbose=0)[0]
        order = np.argsort(probabilities)[::-1]
        data["predictions"] = [{"label": CLASS_NAMES[i], "probability": float(probabilities[i])} for i in order]
        data["success"] = True
        return jsonify(data)

    @app.get("/healthz")
    def healthz():
        return jsonify(ok=True)

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5099)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
    create_app().run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
