"""The yardstick `make bench-serve` measures the stack against: the seed project's serving design.

One threaded Flask process that reads the upload with Pillow, resizes it to 32x32 and calls Keras
`model.predict` on it, one request at a time per thread, with the seed's VGG3 network (its final
configuration: BatchNorm, Dropout, Dense 128). The weights are untrained: only the cost is compared.

    python -m scripts.reference_server --port 5099
"""
import argparse
import io
import logging

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

from training.configs import get_config
from training.data import CLASS_NAMES
from training.models import build_model


def create_app():
    rng = np.random.default_rng(0)
    model = build_model(get_config("final"), rng.integers(0, 256, (64, 32, 32, 3), np.uint8))
    model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        if "image" not in request.files:
            return jsonify(success=False, error="no image field"), 400
        try:
            image = Image.open(io.BytesIO(request.files["image"].read())).convert("RGB").resize((32, 32))
        except Exception as exc:  # the seed's server answered any bad upload with an error body
            return jsonify(success=False, error=str(exc)), 400
        logits = model.predict(np.asarray(image, np.float32)[None], verbose=0)[0]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities)
        return jsonify(success=True, predictions=[{"label": CLASS_NAMES[i], "probability": float(probabilities[i])}
                                                  for i in order])

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
