"""A run directory's memory: a checkpoint per epoch (weights, optimizer, RNG states, Lookahead's
average), state.json and metrics.csv, replaced atomically, so a run killed at any moment resumes
where an uninterrupted one would be; and the configuration a directory belongs to."""

import csv
import io
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import keras

from training.recipe.configs import TrainConfig

STATE = "state.json"


def write_atomically(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)



def seed_states(model):
    """Augmentation/dropout RNG states: save_weights leaves them out, a faithful resume needs them."""
    return {v.path: v for v in model.variables if v.path.endswith("seed_generator_state")}


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: weights + optimizer (a new file), then state.json pointing at it
    (atomic rename), then metrics.csv. A kill at any moment leaves a consistent last epoch."""

    def __init__(self, run_dir, history, wall_time, lookahead=None, monitored="test"):
        super().__init__()
        self.run_dir, self.history, self.wall_time = Path(run_dir), history, wall_time
        self.monitored = monitored
        self.lookahead = lookahead
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.test_start = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        self.test_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        # Training time excludes the per-epoch test evaluation, which only reports progress.
        now = time.perf_counter()
        test_start = self.test_start or now
        seconds = test_start - self.epoch_start
        self.wall_time += seconds
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
               "epoch_seconds": round(seconds, 2), "wall_seconds": round(self.wall_time, 2),
               "test_seconds": round(now - test_start, 2)}
        self.history.append(row)
        weights = self.run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}.weights.h5"
        self.model.save_weights(weights)
        state = {"epoch": epoch + 1, "weights": weights.name, "wall_seconds": self.wall_time,
                 "history": self.history,
                 "seed_states": {k: np.asarray(v).tolist() for k, v in seed_states(self.model).items()},
                 "backend": keras.backend.backend()}
        saved = {weights}
        if self.lookahead and self.lookahead.slow is not None:
            slow = weights.with_name(f"epoch-{epoch + 1:04d}.lookahead.npz")
            np.savez(slow, *self.lookahead.slow_arrays())
            state["lookahead"] = slow.name
            saved.add(slow)
        write_atomically(self.run_dir / STATE, json.dumps(state))
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        for old in (self.run_dir / "checkpoints").glob("epoch-*"):
            if old not in saved:
                old.unlink()
        print(f"epoch {epoch + 1}: {seconds:.1f}s (total {self.wall_time:.0f}s) "
              f"train acc {logs['accuracy']:.4f} {self.monitored} acc {logs.get('val_accuracy', float('nan')):.4f}",
              flush=True)


def write_metrics_csv(path, history):
    rows = io.StringIO(newline="")
    writer = csv.DictWriter(rows, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomically(path, rows.getvalue())


def load_checkpoint(model, run_dir):
    """The weights and optimizer of the last completed epoch, loaded into `model`; returns the
    run's state, None for a fresh run."""
    state_path = Path(run_dir) / STATE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    model.optimizer.build(model.trainable_variables)
    model.load_weights(Path(run_dir) / "checkpoints" / state["weights"])
    return state


def restore(model, run_dir):
    """load_checkpoint, and the augmentation RNGs where the run left them: what resuming needs."""
    state = load_checkpoint(model, run_dir)
    if state is None:
        return None
    for path, variable in seed_states(model).items():
        variable.assign(state["seed_states"][path])
    return state


# What may change between runs in one directory: the epoch budget, and what only shapes evaluation
# and export, not the trained weights.
RESUMABLE_CHANGES = {"epochs", "tta", "description", "reported_accuracy", "reported_epochs"}


def check_same_config(run_dir, config):
    """A run directory belongs to one configuration, apart from RESUMABLE_CHANGES."""
    path = Path(run_dir) / "config.json"
    if path.exists():
        # Fields added since the run began count as their defaults.
        defaults = asdict(TrainConfig(name="", description=""))
        saved = {**json.loads(json.dumps(defaults)), **json.loads(path.read_text())}
        current = json.loads(json.dumps(asdict(config)))
        differing = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if differing:
            sys.exit(f"error: {run_dir} holds a run of a different configuration ({', '.join(differing)} "
                     f"differ); use another --run-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(asdict(config), indent=2))


# --- the run --------------------------------------------------------------------------------


def trained_date(run_dir):
    """The UTC date training finished: when the last epoch's checkpoint was written."""
    state = Path(run_dir) / STATE
    finished = state.stat().st_mtime if state.exists() else time.time()
    return time.strftime("%Y-%m-%d", time.gmtime(finished))
