"""PNG figures of an evaluation: confusion matrix, misclassified images, reliability diagram."""

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt
import numpy as np

from training.recipe.data import CLASS_NAMES


def plot_confusion_matrix(matrix, path):
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(10), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, count, ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_misclassified(images, labels, predictions, confidences, path, count=36):
    """The most confident mistakes: what the model gets wrong and how sure it is."""
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-confidences[wrong])][:count]
    side = int(np.ceil(np.sqrt(max(len(wrong), 1))))
    fig, axes = plt.subplots(side, side, figsize=(1.6 * side, 1.8 * side))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), wrong):
        ax.imshow(images[i])
        ax.set_title(f"{CLASS_NAMES[predictions[i]]} {confidences[i]:.0%}\n(is {CLASS_NAMES[labels[i]]})", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(curves, path):
    """Reliability diagram: accuracy against confidence per bin, one line per `curves` entry
    (label -> (count, mean confidence, accuracy)); a calibrated model lies on the diagonal."""
    fig, (ax, hist_ax) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="calibrated")
    for label, (count, confidence, accuracy) in curves.items():
        used = count > 0
        ax.plot(confidence[used], accuracy[used], marker="o", label=label)
        hist_ax.plot(confidence[used], count[used] / count.sum(), marker=".", label=label)
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability: top-1 accuracy per confidence bin")
    ax.grid(alpha=0.3)
    ax.legend()
    hist_ax.set_xlabel("confidence (top-1 probability)")
    hist_ax.set_ylabel("share of images")
    hist_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
