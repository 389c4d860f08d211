"""Is an upload one of the ten classes at all? Out-of-distribution scores, higher meaning less like
the training images, computed in the exported graph beside the probabilities (one Predict call).

Scores compared (`python -m training.ood compare`, docs/ood.md):
- msp: 1 - the top softmax probability (Hendrycks & Gimpel 2017), the baseline;
- energy: -logsumexp of the logits (Liu et al. 2020);
- mahalanobis: the squared Mahalanobis distance of the penultimate features to the nearest class
  mean, under one covariance shared by the classes (Lee et al. 2018), per feature dimension;
- relative_mahalanobis: the same minus the distance to the features' overall Gaussian (Ren et al.
  2021), which discounts what makes an image unusual for every class alike;
- knn: the distance of the L2-normalized features to their k-th nearest neighbour in a bank of
  training images (Sun et al. 2022).
Class means, covariances and banks are fitted on the training images only (never the held-out
split, which chooses the threshold, nor the test split). The threshold flags THRESHOLD_FLAGS of the
held-out images: any higher and more of the ten classes would be refused.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import keras

METHODS = ("msp", "energy", "mahalanobis", "relative_mahalanobis", "knn")
SHIPPED = "mahalanobis"  # chosen on the validation sets: docs/ood.md
THRESHOLD_FLAGS = 0.05  # share of the held-out training images flagged at the shipped threshold
KNN_BANK, KNN_K = 5000, 10


def with_features(model):
    """`model` with two outputs: the penultimate features (the input of its last Dense layer) and
    its logits; the same layers and weights."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    return keras.Model(model.inputs, [dense.input, model.outputs[0]], name=f"{model.name}_with_features")


def features_and_logits(model, images, batch_size=500):
    """float32 penultimate features [N, D] and logits [N, 10] of uint8 images, one view."""
    twin = with_features(model)
    features, logits = twin.predict(images.astype("float32"), batch_size=batch_size, verbose=0)
    return np.asarray(features, np.float32), np.asarray(logits, np.float32)


def _logsumexp(logits, ops=np):
    top = ops.max(logits, axis=1, keepdims=True)
    return ops.log(ops.sum(ops.exp(logits - top), axis=1)) + top[:, 0]


def _softmax(logits, ops=np):
    exp = ops.exp(logits - ops.max(logits, axis=1, keepdims=True))
    return exp / ops.sum(exp, axis=1, keepdims=True)


def _whitener(centred, shrinkage):
    """L with L L^T the inverse of the (shrunk) covariance of `centred` rows: |x L|^2 is x's
    squared Mahalanobis norm."""
    covariance = centred.T.astype(np.float64) @ centred / len(centred)
    covariance += shrinkage * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    return np.linalg.cholesky(np.linalg.inv(covariance)).astype(np.float32)


@dataclass
class Scorer:
    """One method's fitted constants, and its score in numpy (for choosing) and in the graph."""
    method: str
    constants: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, method, features, labels, shrinkage=1e-3, seed=0):
        if method not in METHODS:
            raise ValueError(f"unknown out-of-distribution score {method!r}; choose from {', '.join(METHODS)}")
        constants = {}
        if method in ("mahalanobis", "relative_mahalanobis"):
            means = np.stack([features[labels == c].mean(axis=0) for c in range(10)])
            whiten = _whitener(features - means[labels], shrinkage)
            constants = {"whiten": whiten, "means": means @ whiten}
            if method == "relative_mahalanobis":
                overall = features.mean(axis=0)
                background = _whitener(features - overall, shrinkage)
                constants.update(background=background, overall=overall @ background)
        elif method == "knn":
            rows = np.random.default_rng(seed).permutation(len(features))[:KNN_BANK]
            constants = {"bank": _normalized(features[rows])}
        return cls(method, constants)

    @property
    def multiply_adds(self):
        """Per image, beyond the network."""
        c = self.constants
        if self.method in ("msp", "energy"):
            return 0
        if self.method == "knn":
            return int(c["bank"].size)
        total = c["whiten"].size + c["means"].size
        return int(total + (c["background"].size + c["overall"].size if "background" in c else 0))

    def score(self, features, logits, ops=np):
        """The score of each image; `ops` is numpy or keras.ops (the export's graph)."""
        c = self.constants
        if self.method == "msp":
            return 1 - ops.max(_softmax(logits, ops), axis=1)
        if self.method == "energy":
            return -_logsumexp(logits, ops)
        if self.method == "knn":
            distances = 2 - 2 * ops.matmul(_normalized(features, ops), ops.transpose(c["bank"]))
            return ops.sort(distances, axis=1)[:, KNN_K - 1]
        dimensions = c["whiten"].shape[0]
        nearest = ops.min(_squared_distances(ops.matmul(features, c["whiten"]), c["means"], ops), axis=1)
        if self.method == "relative_mahalanobis":
            nearest = nearest - _squared_distances(ops.matmul(features, c["background"]), c["overall"][None], ops)[:, 0]
        return nearest / dimensions

    def describe(self):
        return {"method": self.method, "multiply_adds": self.multiply_adds}


def _normalized(x, ops=np):
    return x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=1, keepdims=True)), 1e-12)


def _squared_distances(points, centres, ops=np):
    """[N, C]: |points_n - centres_c|^2."""
    return ops.sum(ops.square(points[:, None, :] - centres[None, :, :]), axis=2)


def threshold(held_out_scores, flags=THRESHOLD_FLAGS):
    """The score above which an image is flagged: `flags` of the held-out images are."""
    return float(np.quantile(held_out_scores, 1 - flags))


def auroc(in_scores, out_scores):
    """P(an out-of-distribution image scores higher than an in-distribution one), ties counted half."""
    ordered = np.sort(in_scores)
    below = np.searchsorted(ordered, out_scores, "left") + np.searchsorted(ordered, out_scores, "right")
    return float(below.mean() / 2 / len(ordered))


def fpr_at_95_tpr(in_scores, out_scores):
    """Share of out-of-distribution images not flagged when 95% of the in-distribution ones pass
    (the threshold rule above, THRESHOLD_FLAGS = 5%)."""
    return float((out_scores <= threshold(in_scores, 0.05)).mean())


@dataclass
class OodHead:
    """What an export folds in: the scorer and its threshold, with what they flag where chosen."""
    scorer: Scorer
    threshold: float
    flagged: dict  # set name -> share flagged at the threshold

    def card(self):
        return {**self.scorer.describe(), "threshold": round(self.threshold, 6),
                "flagged_at_threshold": {k: round(v, 4) for k, v in self.flagged.items()}}


def fit_head(method, model, train, validation, temperature=1.0, ood_images=None):
    """The head an export folds in: `method` fitted on the training images' features, the
    threshold on the held-out ones; with `ood_images` (uint8, preprocessed as served), what it flags
    of them too."""
    features, logits = features_and_logits(model, train.images)
    scorer = Scorer.fit(method, features, train.labels)

    def scores(images):
        f, l = features_and_logits(model, images)
        return scorer.score(f, l / temperature)
    held_out = scores(validation.images)
    limit = threshold(held_out)
    flagged = {"held-out training images": float((held_out > limit).mean())}
    if ood_images is not None and len(ood_images):
        flagged["out-of-distribution validation images"] = float((scores(ood_images) > limit).mean())
    return OodHead(scorer, limit, flagged)


# --- choosing a method on images from files ---------------------------------------------------

def load_image_folder(folder, max_pixels=40_000_000):
    """Every image file under `folder`, as the worker preprocesses an upload: (uint8 [N,32,32,3],
    their paths relative to folder); files the worker would refuse are skipped."""
    from worker.preprocess import ImageError, preprocess
    folder = Path(folder)
    pixels, names = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            pixels.append(preprocess(path.read_bytes(), max_pixels))
        except ImageError:
            continue
        names.append(str(path.relative_to(folder)))
    return np.stack(pixels) if pixels else np.zeros((0, 32, 32, 3), np.uint8), names


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def compare(model, temperature, train, validation, sets):
    """AUROC and FPR at 95% TPR of every method: held-out images against each set of `sets`
    (name -> uint8 images), and what each flags of every set at its threshold."""
    features, logits = features_and_logits(model, train.images)
    held_features, held_logits = features_and_logits(model, validation.images)
    outside = {name: features_and_logits(model, images) for name, images in sets.items()}
    rows = []
    for method in METHODS:
        scorer = Scorer.fit(method, features, train.labels)
        held = scorer.score(held_features, held_logits / temperature)
        limit = threshold(held)
        row = {"method": method, "multiply_adds": scorer.multiply_adds, "threshold": limit, "sets": {}}
        for name, (f, l) in outside.items():
            scores = scorer.score(f, l / temperature)
            row["sets"][name] = {"images": len(scores), "auroc": auroc(held, scores),
                                 "fpr_at_95_tpr": fpr_at_95_tpr(held, scores), "flagged": float((scores > limit).mean())}
        rows.append(row)
    return rows


def markdown(rows):
    names = list(rows[0]["sets"])
    header = "| score | multiply-adds | " + " | ".join(f"{n}: AUROC / FPR95 / flagged" for n in names) + " |"
    lines = [header, "|" + "---|" * (2 + len(names))]
    for row in rows:
        cells = [f"{s['auroc']:.3f} / {s['fpr_at_95_tpr']:.1%} / {s['flagged']:.1%}" for s in row["sets"].values()]
        lines.append(f"| {row['method']} | {row['multiply_adds']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run directory with a held-out split (e.g. runs/student)")
    parser.add_argument("--data", default="data")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=FOLDER",
                        help="a folder of images to score against the held-out split (repeatable)")
    parser.add_argument("--out", help="write the table (markdown) and the figures (JSON) here")
    args = parser.parse_args(argv)
    from training.finish import finished_meta, network_from_run, saved_config
    from training.train import load_splits
    config = saved_config(args.run_dir)
    if not config.validation_size:
        sys.exit(f"error: {args.run_dir} holds no training images out; the threshold needs them")
    meta = finished_meta(args.run_dir, config)
    splits = load_splits(config, args.data, meta.get("train_limit"), meta.get("test_limit"))
    model, _ = network_from_run(config, args.run_dir, splits.train.images)
    evaluation = Path(args.run_dir) / "evaluation" / "evaluation.json"
    temperature = json.loads(evaluation.read_text()).get("temperature", 1.0) if evaluation.is_file() else 1.0
    sets = {}
    for item in args.set:
        name, _, folder = item.partition("=")
        sets[name], _ = load_image_folder(folder)
        print(f"{name}: {len(sets[name])} images from {folder}", file=sys.stderr)
    rows = compare(model, temperature, splits.train, splits.validation, sets)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ood.md").write_text(table + "\n")
        (out / "ood.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
