"""The model card: what a served version is, travelling with it.

Each exported version carries its card twice: as `assets.extra/model_card.json` beside the
SavedModel (for people and tools reading the model volume) and as a second signature,
`model_card`, that takes no input and returns the same JSON as a string scalar (output `card`).
The gateway has no model files (in Kubernetes only TF Serving mounts them), so the card reaches
it through the running system: each worker fetches it with one Predict call per version, after
the version passed the serving contract, and publishes it in Redis; `GET /model` returns it.

The card holds what the version cannot say about itself from its signature: class names, test
accuracy and ECE from its evaluation report (and on the JPEG-compressed test images), multiply-adds and parameters per image (counted in
the export, as `make cost` counts them), the training configuration, its date and the data.
The version number is not in it: a version is its directory's name, and a copy may be served
under another number (the tests serve the shipped model as version 1).

`python -m training.ship.card` adds a card to a version exported before cards existed, without
touching its `serving_default` signature: the SavedModel is re-saved with the extra signature
into a staging directory, which replaces the version only once its predictions on real test
images, its signature and its weights are proved identical:

    python -m training.ship.card models/cifar10/2 --config training/results/jpeg-copy/student/config.json \\
        --evaluation training/results/jpeg-copy/student/evaluation/evaluation.json --trained 2026-11-27
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from training.recipe.contract import INPUT, SIGNATURE, probabilities_in_batches
from training.recipe.data import CLASS_NAMES, load_cifar10
from training.ship.cost import multiply_adds, parameters
from training.ship.export import serving_archive, write_version

CARD_SIGNATURE = "model_card"
CARD_OUTPUT = "card"
CARD_FILE = Path("assets.extra") / "model_card.json"


def build_card(config: dict, evaluation: dict, trained: str, cost: dict | None = None, ood=None) -> dict:
    """The card from a run's configuration (config.json / asdict(config)), its test evaluation
    report (evaluation.json) and the date training finished (YYYY-MM-DD). `cost` (multiply_adds,
    parameters) is measured on the export; export_savedmodel fills it in. `ood`: the version's
    out-of-distribution head (training.ship.ood.OodHead): its method, cost, threshold and what it flags."""
    card = {
        "classes": list(CLASS_NAMES),
        "description": config["description"],
        "evaluation": {
            "dataset": evaluation["dataset"],
            "split": "test",
            "images": evaluation["images"],
            "accuracy": round(float(evaluation["accuracy"]), 4),
            "ece": round(float(evaluation["ece"]), 4) if evaluation.get("ece") is not None else None,
        },
        "training": {
            "config": config["name"],
            "date": trained,
            "data": evaluation["dataset"],  # the test split's dataset: training uses the train split of it
            "epochs": config["epochs"],
            "precision": config.get("precision", "float32"),
            "test_time_augmentation": config["tta"],
            "temperature": round(float(evaluation.get("temperature", 1.0)), 4),
            "teacher": config.get("teacher"),
        },
    }
    if "robustness" in evaluation:
        shifted = evaluation["robustness"]
        card["evaluation"]["robustness"] = {"dataset": shifted["dataset"], "accuracy": round(shifted["accuracy"], 4),
                                            "ece": round(shifted["ece"], 4)}
    if ood is not None:
        card["out_of_distribution"] = ood.card()
    if cost is not None:
        card["cost_per_image"] = cost
    return card


def measured_cost(export_dir) -> dict:
    """Per-image cost of the served signature, as `make cost` counts it."""
    return {"multiply_adds": multiply_adds(export_dir), "parameters": parameters(export_dir)}


def export_with_card(model, base_path, card: dict | None, version=None, **serving) -> Path:
    """export.export_savedmodel with the version's `card` (None: a version without one): its
    `model_card` signature and assets.extra/model_card.json, with the per-image cost measured
    on the export. `serving`: serving_archive's tta, temperature and ood."""
    archive = serving_archive(model, **serving)

    def write(path):
        if card is None:
            archive.write_out(path, verbose=False)
            return
        with tempfile.TemporaryDirectory() as plain:
            archive.write_out(plain, verbose=False)
            save_with_card(plain, {**card, "cost_per_image": measured_cost(plain)}, path)
    return write_version(base_path, write, version)


def save_with_card(source_dir, card: dict, out_dir) -> None:
    """Re-saves the SavedModel in source_dir into out_dir with its `serving_default` signature
    as it is and a `model_card` signature returning `card`, and writes assets.extra/model_card.json."""
    loaded = tf.saved_model.load(str(source_dir))  # the signature's variables live as long as this
    serve = loaded.signatures[SIGNATURE]
    text = json.dumps(card, sort_keys=True)

    @tf.function(input_signature=[])
    def model_card():
        return {CARD_OUTPUT: tf.constant(text)}

    loaded.model_card = model_card  # tracked, so the signature's function is saved with the object
    tf.saved_model.save(loaded, str(out_dir),
                        signatures={SIGNATURE: serve, CARD_SIGNATURE: model_card.get_concrete_function()})
    path = Path(out_dir) / CARD_FILE
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(card, indent=2) + "\n")


def read_card(export_dir) -> dict:
    """The card as the `model_card` signature returns it (what TF Serving answers the worker)."""
    signature = tf.saved_model.load(str(export_dir)).signatures[CARD_SIGNATURE]
    return json.loads(signature()[CARD_OUTPUT].numpy().decode())


# --- proving a re-saved version serves what the original did ----------------------------------

def signature_contract(export_dir) -> dict:
    """serving_default's inputs and outputs as TF Serving reports them: name -> (dtype, shape)."""
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    signature = next(mg for mg in saved.meta_graphs if "serve" in mg.meta_info_def.tags).signature_def[SIGNATURE]

    def describe(tensors):
        return {name: (info.dtype, [d.size for d in info.tensor_shape.dim]) for name, info in tensors.items()}
    return {"method": signature.method_name, "inputs": describe(signature.inputs),
            "outputs": describe(signature.outputs)}


def weight_digests(export_dir) -> list[tuple]:
    """Every stored tensor's dtype, shape and content hash, sorted: the weights, whatever their names."""
    reader = tf.train.load_checkpoint(str(Path(export_dir) / "variables" / "variables"))
    return sorted((str(dtype.name), tuple(reader.get_variable_to_shape_map()[name]),
                   hashlib.sha256(reader.get_tensor(name).tobytes()).hexdigest())
                  for name, dtype in reader.get_variable_to_dtype_map().items()
                  if name != "_CHECKPOINTABLE_OBJECT_GRAPH")


def served_outputs(export_dir, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    serve = tf.saved_model.load(str(export_dir)).signatures[SIGNATURE]
    probabilities = probabilities_in_batches(serve, images, batch_size=250)
    classes = serve(**{INPUT: tf.constant(images[:1])})["classes"].numpy()
    return probabilities, classes


def prove_identical(original, candidate, images: np.ndarray) -> list[str]:
    """What differs between two versions' serving_default (empty: nothing): signature, weights,
    multiply-adds, and the outputs for `images`, bit for bit."""
    problems = []
    if signature_contract(original) != signature_contract(candidate):
        problems.append(f"signature {signature_contract(original)} became {signature_contract(candidate)}")
    if weight_digests(original) != weight_digests(candidate):
        problems.append("the stored weights differ")
    if multiply_adds(original) != multiply_adds(candidate):
        problems.append(f"multiply-adds {multiply_adds(original)} became {multiply_adds(candidate)}")
    (before, before_classes), (after, after_classes) = (served_outputs(original, images),
                                                        served_outputs(candidate, images))
    if not np.array_equal(before, after):
        problems.append(f"probabilities differ on {int((before != after).any(axis=1).sum())} of {len(images)} images "
                        f"(max {np.abs(before - after).max():.3g})")
    if not np.array_equal(before_classes, after_classes):
        problems.append("class names differ")
    return problems


def add_card(export_dir, card: dict, images: np.ndarray) -> Path:
    """Replaces the version in export_dir with a copy that carries `card`, once proved identical."""
    export_dir = Path(export_dir).resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".card-{export_dir.name}-", dir=export_dir.parent))
    retired = export_dir.parent / f".replaced-{export_dir.name}-{staging.name.rsplit('-', 1)[-1]}"
    try:
        save_with_card(export_dir, card, staging)
        problems = prove_identical(export_dir, staging, images)
        if problems:
            raise SystemExit(f"not replacing {export_dir}: " + "; ".join(problems))
        if read_card(staging) != card:
            raise SystemExit(f"not replacing {export_dir}: the model_card signature does not return the card")
        os.chmod(staging, 0o755)
        # Two renames: a server polling the base path sees the old version or the new one, never half.
        os.rename(export_dir, retired)
        os.rename(staging, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return export_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an exported SavedModel version directory, replaced in place")
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--evaluation", required=True, help="the version's evaluation.json (test split)")
    parser.add_argument("--trained", required=True, help="the date training finished, YYYY-MM-DD")
    parser.add_argument("--data", default="data", help="CIFAR-10, for the test images of the proof")
    parser.add_argument("--images", type=int, default=1000, help="test images whose predictions must not change")
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    evaluation = json.loads(Path(args.evaluation).read_text())
    card = build_card(config, evaluation, args.trained, measured_cost(args.export))
    _, test = load_cifar10(args.data)
    add_card(args.export, card, test.images[:args.images])
    print(f"{args.export}: card added; serving_default identical on {min(args.images, len(test.images))} "
          f"test images, in its signature, weights and multiply-adds", file=sys.stderr)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
