"""Evaluation report for a trained model on the test split: accuracy, confusion matrix, the most
confident mistakes, and calibration (ECE over 15 bins, NLL, reliability diagram); and, as a
robustness check, accuracy and ECE on the same test images after JPEG compression at quality 75
("CIFAR-10 test, JPEG q75": the shift that users' uploads carry).

    python -m training.ship.evaluate --export models/cifar10/3 --data data [--out DIR]
"""

import argparse
import json
from pathlib import Path

import numpy as np

from training.recipe.configs import TTA
from training.recipe.contract import predict_exported
from training.recipe.data import CLASS_NAMES, JPEG_TEST, dataset_label, jpeg_compressed, load_cifar10
from training.recipe.models import log_probabilities
from training.ship.calibration import ECE_BINS, fit_temperature, reliability, softmax, summary
from training.ship.export import predict_keras
from training.ship.plots import plot_confusion_matrix, plot_misclassified, plot_reliability


def robustness(predict, split):
    """What `predict` (uint8 images -> probabilities) scores on `split` under JPEG q75."""
    shifted = jpeg_compressed(split)
    probabilities = predict(shifted.images)
    return {"dataset": JPEG_TEST, "accuracy": float((probabilities.argmax(axis=1) == split.labels).mean()),
            "ece": summary(probabilities, split.labels)["ece"]}


def report(probabilities, split, out_dir, dataset, before_temperature=None, extra=None):
    """The report of the served `probabilities`, as JSON, markdown and PNGs; with
    `before_temperature`, the uncalibrated probabilities are compared. `extra` joins the JSON; its
    "robustness" (see robustness()) is reported too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = probabilities.argmax(axis=1)
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (split.labels, predictions), 1)
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    calibration = summary(probabilities, split.labels)
    curves = {"served": reliability(probabilities, split.labels)}
    result = {
        "dataset": dataset,
        "images": int(len(split.labels)),
        "accuracy": float((predictions == split.labels).mean()),
        "ece": calibration["ece"],
        "nll": calibration["nll"],
        "mean_confidence": calibration["mean_confidence"],
        "per_class_accuracy": {name: float(a) for name, a in zip(CLASS_NAMES, per_class)},
        "confusion_matrix": matrix.tolist(),
    }
    lines = [f"Test accuracy: **{result['accuracy']:.2%}** on {result['images']} images",
             f"Calibration: ECE {result['ece']:.2%} ({ECE_BINS} bins), NLL {result['nll']:.4f}, "
             f"mean top-1 confidence {result['mean_confidence']:.2%}"]
    if before_temperature is not None:
        before = summary(before_temperature, split.labels)
        result["before_temperature"] = before
        curves["before temperature scaling"] = reliability(before_temperature, split.labels)
        lines.append(f"Before temperature scaling: ECE {before['ece']:.2%}, NLL {before['nll']:.4f}, "
                     f"mean top-1 confidence {before['mean_confidence']:.2%}")
    result.update(extra or {})
    if "robustness" in result:
        shifted = result["robustness"]
        lines.append(f"On {shifted['dataset']}: accuracy {shifted['accuracy']:.2%}, ECE {shifted['ece']:.2%}")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {name} | {a:.2%} |" for name, a in zip(CLASS_NAMES, per_class))
    (out / "report.md").write_text(
        f"# Evaluation on {dataset}\n\n" + "\n\n".join(lines) +
        f"\n\n| class | accuracy |\n|---|---|\n{rows}\n\n![confusion matrix](confusion_matrix.png)\n\n"
        f"![reliability diagram](reliability.png)\n\n![most confident mistakes](misclassified.png)\n")
    plot_confusion_matrix(matrix, out / "confusion_matrix.png")
    plot_reliability(curves, out / "reliability.png")
    plot_misclassified(split.images, split.labels, predictions, probabilities.max(axis=1), out / "misclassified.png")
    return result


def calibrate(model, config, validation):
    """The softmax temperature that minimizes the NLL on the validation split, that split's
    figures before and after it, and its accuracy under each test-time augmentation (what a
    choice of `tta` would buy)."""
    by_tta = {tta: predict_keras(model, validation.images, tta) for tta in TTA}
    probabilities = by_tta[config.tta]
    temperature = fit_temperature(log_probabilities(probabilities), validation.labels)
    accuracy_by_tta = {tta: float((p.argmax(axis=1) == validation.labels).mean()) for tta, p in by_tta.items()}
    return temperature, {"images": int(len(validation.labels)), "temperature": temperature,
                         "before": summary(probabilities, validation.labels),
                         "after": summary(softmax(log_probabilities(probabilities), temperature),
                                          validation.labels),
                         "accuracy_by_tta": accuracy_by_tta}


def write_evaluation(model, config, split, out_dir, dataset="CIFAR-10", validation=None):
    """The test report of what the export will serve. With a validation split, a temperature is
    fitted there first (the test split chooses nothing); returns (report, temperature)."""
    temperature, extra = 1.0, {}
    if validation is not None:
        temperature, fitted = calibrate(model, config, validation)
        extra = {"validation": fitted, "temperature": temperature}

    def predict(images):
        return predict_keras(model, images, config.tta, temperature=temperature)
    served = predict(split.images)
    before = softmax(log_probabilities(served), 1 / temperature) if validation is not None else None
    extra["robustness"] = robustness(predict, split)
    return report(served, split, out_dir, dataset, before, extra), temperature


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="an exported SavedModel version directory")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", help="report directory (default: runs/evaluate-<version>)")
    args = parser.parse_args(argv)
    _, test = load_cifar10(args.data)
    out = args.out or f"runs/evaluate-{Path(args.export).name}"

    def predict(images):
        return predict_exported(args.export, images)
    result = report(predict(test.images), test, out, dataset_label(args.data),
                    extra={"robustness": robustness(predict, test)})
    shifted = result["robustness"]
    print(f"test accuracy {result['accuracy']:.4f}, ECE {result['ece']:.4f}, NLL {result['nll']:.4f} "
          f"on {result['dataset']}; {shifted['accuracy']:.4f}, ECE {shifted['ece']:.4f} on {shifted['dataset']}; "
          f"report in {out}/report.md")


if __name__ == "__main__":
    main()
