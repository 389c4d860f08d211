"""Is an upload one of the ten classes at all? Out-of-distribution scores, higher meaning less like
the training images, computed in the exported graph beside the probabilities (one Predict call).

Scores compared (`python -m training.ship.ood RUN_DIR --set NAME=FOLDER`, docs/ood.md):
- msp: 1 - the top softmax probability (Hendrycks & Gimpel 2017), the baseline;
- energy: -logsumexp of the logits (Liu et al. 2020);
- mahalanobis: the squared Mahalanobis distance of the penultimate features to the nearest class
  mean, under one covariance shared by the classes (Lee et al. 2018), per feature dimension;
- relative_mahalanobis: the same minus the distance to the features' overall Gaussian (Ren et al.
  2021), which discounts what makes an image unusual for every class alike;
- knn: the distance of the L2-normalized features to their k-th nearest neighbour in a bank of
  training images (Sun et al. 2022);
- the _blocks variants: the same on the features of every block (each block's output averaged
  over its pixels, beside the penultimate features), as Lee et al. score several layers: earlier
  blocks see textures and colours that the last one has pooled away;
- energy+X: the sum of the two scores, each standardized by its mean and spread over the training
  images: the logits and the features miss different images.
Class means, covariances and banks are fitted on the training images only (never the held-out
split, which chooses the threshold, nor the test split). The threshold flags THRESHOLD_FLAGS of the
held-out images: any higher and more of the ten classes would be refused. Given photos of the ten
classes and images of none of them to choose on, it is instead the one that tells those two apart
best (most of the out-of-class images flagged minus most of the in-class photos), where that flags
no more than THRESHOLD_FLAGS of the held-out images: a real photo of a dog is further from the
training images than a held-out CIFAR-10 one, and a threshold set by the latter alone flags it.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import keras

from training.recipe.images import load_image_folder

METHODS = ("msp", "energy", "mahalanobis", "relative_mahalanobis", "knn", "mahalanobis_blocks",
           "relative_mahalanobis_blocks", "knn_blocks", "energy+relative_mahalanobis",
           "energy+relative_mahalanobis_blocks", "energy+knn_blocks")
# An export's head unless told otherwise (version 4's, chosen on ood-val alone); version 5's is
# energy, chosen with in-class photos too (training.ship.finish --ood-method, docs/ood.md).
SHIPPED = "energy+relative_mahalanobis_blocks"
THRESHOLD_FLAGS = 0.05  # the most of the held-out training images a threshold may flag
HELD_OUT_RULE = f"flags {THRESHOLD_FLAGS:.0%} of the held-out training images"
KNN_BANK, KNN_K = 5000, 10


def block_outputs(model):
    """Each block's output tensor: what the next block's first convolution reads (the input of
    the convolution before each max-pool), and the last block's, which the global pooling reads."""
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    firsts = [pool.input._keras_history.operation for pool in pools]
    tops = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalMaxPooling2D)]
    return [conv.input for conv in firsts[1:]] + [top.input for top in tops]


def with_features(model, blocks=False):
    """`model` with two outputs: the penultimate features (the input of its last Dense layer), or
    with `blocks` every block's output averaged over its pixels beside them; and its logits. The
    same layers and weights."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    features = dense.input
    if blocks:
        pooled = [keras.layers.GlobalAveragePooling2D()(tensor) for tensor in block_outputs(model)]
        features = keras.layers.Concatenate()([*pooled, features])
    return keras.Model(model.inputs, [features, model.outputs[0]], name=f"{model.name}_with_features")


def features_and_logits(model, images, blocks=False, batch_size=500):
    """float32 features [N, D] (with_features) and logits [N, 10] of uint8 images, one view."""
    twin = with_features(model, blocks)
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

    @property
    def blocks(self):
        """Whether it scores every block's features (with_features(blocks=True))."""
        return self.method.endswith("_blocks")

    @classmethod
    def fit(cls, method, features, labels, logits=None, shrinkage=1e-3, seed=0):
        """`logits` (divided by the served temperature) are needed by a sum of scores only."""
        if method not in METHODS:
            raise ValueError(f"unknown out-of-distribution score {method!r}; choose from {', '.join(METHODS)}")
        if "+" in method:
            parts = [cls.fit(part, features, labels, shrinkage=shrinkage, seed=seed) for part in method.split("+")]
            scores = [part.score(features, logits) for part in parts]
            return cls(method, {"parts": parts, "location": [float(np.mean(s)) for s in scores],
                                "scale": [float(np.std(s)) for s in scores]})
        constants = {}
        if method.removesuffix("_blocks") in ("mahalanobis", "relative_mahalanobis"):
            means = np.stack([features[labels == c].mean(axis=0) for c in range(10)])
            whiten = _whitener(features - means[labels], shrinkage)
            constants = {"whiten": whiten, "means": means @ whiten}
            if method.startswith("relative_mahalanobis"):
                overall = features.mean(axis=0)
                background = _whitener(features - overall, shrinkage)
                constants.update(background=background, overall=overall @ background)
        elif method.startswith("knn"):
            rows = np.random.default_rng(seed).permutation(len(features))[:KNN_BANK]
            constants = {"bank": _normalized(features[rows])}
        return cls(method, constants)

    @property
    def multiply_adds(self):
        """Per image, beyond the network."""
        c = self.constants
        if "parts" in c:
            return sum(part.multiply_adds for part in c["parts"])
        if self.method in ("msp", "energy"):
            return 0
        if self.method.startswith("knn"):
            return int(c["bank"].size)
        total = c["whiten"].size + c["means"].size
        return int(total + (c["background"].size + c["overall"].size if "background" in c else 0))

    def score(self, features, logits, ops=np):
        """The score of each image; `ops` is numpy or keras.ops (the export's graph)."""
        c = self.constants
        if "parts" in c:
            return sum((part.score(features, logits, ops) - location) / scale
                       for part, location, scale in zip(c["parts"], c["location"], c["scale"]))
        if self.method == "msp":
            return 1 - ops.max(_softmax(logits, ops), axis=1)
        if self.method == "energy":
            return -_logsumexp(logits, ops)
        if self.method.startswith("knn"):
            distances = 2 - 2 * ops.matmul(_normalized(features, ops), ops.transpose(c["bank"]))
            return ops.sort(distances, axis=1)[:, KNN_K - 1]
        dimensions = c["whiten"].shape[0]
        nearest = ops.min(_squared_distances(ops.matmul(features, c["whiten"]), c["means"], ops), axis=1)
        if self.method.startswith("relative_mahalanobis"):
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
    rule: str = HELD_OUT_RULE

    def card(self):
        return {**self.scorer.describe(), "threshold": round(self.threshold, 6), "threshold_rule": self.rule,
                "flagged_at_threshold": {k: round(v, 4) for k, v in self.flagged.items()}}


def separating_threshold(inside, outside):
    """The threshold with the largest share of `outside` above it minus the share of `inside`
    (Youden's J): the point of the ROC curve furthest from chance."""
    candidates = np.unique(np.concatenate([inside, outside]))
    gain = [(outside > t).mean() - (inside > t).mean() for t in candidates]
    return float(candidates[int(np.argmax(gain))])


def choose_threshold(held_out, in_class=None, out_of_class=None):
    """(threshold, the rule that set it): the one that flags THRESHOLD_FLAGS of the held-out scores,
    or with in-class and out-of-class scores to choose on, the one that separates them best as long
    as it flags no more of the held-out ones."""
    limit = threshold(held_out)
    if in_class is None or out_of_class is None or not len(in_class) or not len(out_of_class):
        return limit, HELD_OUT_RULE
    best = separating_threshold(in_class, out_of_class)
    if best >= limit:
        return best, (f"best separates in-class photos from out-of-class images (Youden's J), "
                      f"flagging at most {THRESHOLD_FLAGS:.0%} of the held-out training images")
    return limit, HELD_OUT_RULE + f" (the best separating one, {best:.4f}, would flag more)"


def fit_head(method, model, train, validation, temperature=1.0, ood_images=None, in_class_photos=None):
    """The head an export folds in: `method` fitted on the training images' features, the
    threshold on the held-out ones; with `ood_images` (uint8, preprocessed as served), what it flags
    of them too, and with `in_class_photos` as well, the threshold is chosen between the two
    (choose_threshold)."""
    blocks = Scorer(method).blocks
    features, logits = features_and_logits(model, train.images, blocks)
    scorer = Scorer.fit(method, features, train.labels, logits / temperature)

    def scores(images):
        f, l = features_and_logits(model, images, blocks)
        return scorer.score(f, l / temperature)
    held_out = scores(validation.images)
    outside = scores(ood_images) if ood_images is not None and len(ood_images) else None
    inside = scores(in_class_photos) if in_class_photos is not None and len(in_class_photos) else None
    limit, rule = choose_threshold(held_out, inside, outside)
    flagged = {"held-out training images": float((held_out > limit).mean())}
    if outside is not None:
        flagged["out-of-distribution validation images"] = float((outside > limit).mean())
    if inside is not None:
        flagged["in-class validation photos"] = float((inside > limit).mean())
    return OodHead(scorer, limit, flagged, rule)


# --- choosing a method on images from files ---------------------------------------------------

def compare(model, temperature, train, validation, sets):
    """AUROC and FPR at 95% TPR of every method: held-out images against each set of `sets`
    (name -> uint8 images), and what each flags of every set at its threshold."""
    last = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1].input.shape[-1]

    def features(images):  # every block's, the penultimate ones last: one pass for both kinds
        every, logits = features_and_logits(model, images, blocks=True)
        return {True: (every, logits), False: (every[:, -last:], logits)}
    fitted, held, outside = features(train.images), features(validation.images), {n: features(i) for n, i in sets.items()}
    rows = []
    for method in METHODS:
        blocks = Scorer(method).blocks
        scorer = Scorer.fit(method, fitted[blocks][0], train.labels, fitted[blocks][1] / temperature)
        held_scores = scorer.score(held[blocks][0], held[blocks][1] / temperature)
        limit = threshold(held_scores)
        row = {"method": method, "multiply_adds": scorer.multiply_adds, "threshold": limit, "sets": {}}
        for name, by_blocks in outside.items():
            f, l = by_blocks[blocks]
            scores = scorer.score(f, l / temperature)
            row["sets"][name] = {"images": len(scores), "auroc": auroc(held_scores, scores),
                                 "fpr_at_95_tpr": fpr_at_95_tpr(held_scores, scores),
                                 "flagged": float((scores > limit).mean())}
            row.setdefault("scores", {})[name] = scores
        rows.append(row)
    return rows


def pair_auroc(rows, inside, outside):
    """Per method, AUROC of set `outside` against set `inside` (instead of the held-out images):
    in-class photos against out-of-class ones, as the service must tell them apart."""
    for row in rows:
        row[f"auroc {outside} vs {inside}"] = auroc(row["scores"][inside], row["scores"][outside])


def markdown(rows):
    names = list(rows[0]["sets"])
    pairs = [key for key in rows[0] if key.startswith("auroc ")]
    header = ("| score | multiply-adds | " + " | ".join(f"{n}: AUROC / FPR95 / flagged" for n in names)
              + "".join(f" | {p}" for p in pairs) + " |")
    lines = [header, "|" + "---|" * (2 + len(names) + len(pairs))]
    for row in rows:
        cells = [f"{s['auroc']:.3f} / {s['fpr_at_95_tpr']:.1%} / {s['flagged']:.1%}" for s in row["sets"].values()]
        cells += [f"{row[p]:.3f}" for p in pairs]
        lines.append(f"| {row['method']} | {row['multiply_adds']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run directory with a held-out split (e.g. runs/student)")
    parser.add_argument("--data", default="data")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=FOLDER",
                        help="a folder of images to score against the held-out split (repeatable)")
    parser.add_argument("--pair", action="append", default=[], metavar="IN,OUT",
                        help="also the AUROC of set OUT against set IN, e.g. out-of-class photos against in-class ones")
    parser.add_argument("--out", help="write the table (markdown) and the figures (JSON) here")
    args = parser.parse_args(argv)
    from training.run.rundir import finished_meta, network_from_run, saved_config
    from training.run.loop import load_splits
    config = saved_config(args.run_dir)
    if not config.validation_size:
        sys.exit(f"error: {args.run_dir} holds no training images out; the threshold needs them")
    meta = finished_meta(args.run_dir, config)
    splits = load_splits(config, args.data, meta.get("train_limit"), meta.get("test_limit"))
    model, _ = network_from_run(config, args.run_dir, splits.train.images)
    # As the export fits it: on the held-out images' logits (one view, as the score sees them).
    from training.ship.calibration import fit_temperature
    temperature = fit_temperature(features_and_logits(model, splits.validation.images)[1], splits.validation.labels)
    sets = {}
    for item in args.set:
        name, _, folder = item.partition("=")
        sets[name], _ = load_image_folder(folder)
        print(f"{name}: {len(sets[name])} images from {folder}", file=sys.stderr)
    rows = compare(model, temperature, splits.train, splits.validation, sets)
    for pair in args.pair:
        pair_auroc(rows, *pair.split(","))
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ood.md").write_text(table + "\n")
        figures = [{k: v for k, v in row.items() if k != "scores"} for row in rows]
        (out / "ood.json").write_text(json.dumps({"temperature": temperature, "methods": figures}, indent=2))


if __name__ == "__main__":
    main()
