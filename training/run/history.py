"""history.png: train and test (or validation) loss and accuracy per epoch, like the seed's plots.
matplotlib is imported only to draw: a bare JAX machine without it trains all the same."""

import importlib.util
import textwrap
from pathlib import Path

import numpy as np


def draw_history(run_dir, config, history):
    """history.png, where matplotlib is installed (a bare JAX machine may lack it: then `make
    export` draws it from state.json)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no history.png (make export draws it)")
        return
    plot_history(history, Path(run_dir) / "history.png", title=f"{config.name}: {config.description}",
                 monitored="validation" if config.validation_size else "test")


def plot_history(history, path, title="", monitored="test"):
    """Train and test (or validation) loss and accuracy per epoch, as in the seed's plots."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")  # files only: training runs headless
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, [row[metric] for row in history], color="tab:blue", label="train")
        ax.plot(epochs, [row.get(f"val_{metric}", np.nan) for row in history], color="tab:orange", label=monitored)
        ax.set_title(f"{'Cross entropy loss' if metric == 'loss' else 'Classification accuracy'}")
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_xlabel("epoch")
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
