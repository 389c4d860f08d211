"""Evaluation report for a trained model on the test split.

    python -m training.evaluate --export models/cifar10/1 --data data [--out DIR]
"""

import argparse
import json
from pathlib import Path

import numpy as np

from training.data import CLASS_NAMES, dataset_label, load_cifar10
from training.export import predict_exported, predict_keras
from training.plots import plot_confusion_matrix, plot_misclassified


def report(probabilities, split, out_dir, dataset):
    """accuracy, per-class accuracy and the confusion matrix, as JSON, markdown and PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = probabilities.argmax(axis=1)
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (split.labels, predictions), 1)
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    result = {
        "dataset": dataset,
        "images": int(len(split.labels)),
        "accuracy": float((predictions == split.labels).mean()),
        "per_class_accuracy": {name: float(a) for name, a in zip(CLASS_NAMES, per_class)},
        "confusion_matrix": matrix.tolist(),
    }
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {name} | {a:.2%} |" for name, a in zip(CLASS_NAMES, per_class))
    (out / "report.md").write_text(
        f"# Evaluation on {dataset}\n\nTest accuracy: **{result['accuracy']:.2%}** on {result['images']} images\n\n"
        f"| class | accuracy |\n|---|---|\n{rows}\n\n![confusion matrix](confusion_matrix.png)\n\n"
        f"![most confident mistakes](misclassified.png)\n")
    plot_confusion_matrix(matrix, out / "confusion_matrix.png")
    plot_misclassified(split.images, split.labels, predictions, probabilities.max(axis=1), out / "misclassified.png")
    return result


def write_evaluation(model, config, split, out_dir, dataset="CIFAR-10"):
    return report(predict_keras(model, split.images, config.tta), split, out_dir, dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="an exported SavedModel version directory")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", help="report directory (default: runs/evaluate-<version>)")
    args = parser.parse_args(argv)
    _, test = load_cifar10(args.data)
    out = args.out or f"runs/evaluate-{Path(args.export).name}"
    result = report(predict_exported(args.export, test.images), test, out, dataset_label(args.data))
    print(f"test accuracy {result['accuracy']:.4f} on {result['dataset']}; report in {out}/report.md")


if __name__ == "__main__":
    main()
