"""Reading a run directory: its configuration, its weights file's meta, and the trained network,
rebuilt by the current backend from the backend-neutral weights file (whichever backend trained it)."""

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from training.recipe.configs import TrainConfig
from training.recipe.data import channel_stats
from training.recipe.models import WEIGHTS, build_model, load_network_weights


def saved_config(run_dir):
    """The TrainConfig a run directory's config.json holds."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.json)")
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


def weights_meta(run_dir):
    """The meta of a run's weights file (epoch, backend, slice, channel statistics); refuses a run
    without one."""
    weights = Path(run_dir) / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{weights}: missing; the run has not finished (train it to the end first)")
    with np.load(weights) as saved:
        return json.loads(str(saved["meta"]))


def finished_meta(run_dir, config):
    """weights_meta of a run that trained all of config's epochs; refuses one that did not."""
    meta = weights_meta(run_dir)
    if meta["epoch"] < config.epochs:
        raise ValueError(f"{run_dir} is not finished ({meta['epoch']} of {config.epochs} epochs)")
    return meta


def network_from_run(config, run_dir, train_images, own_statistics=False):
    """The run's trained network, built in float32 by the current backend; and the file's meta.
    `own_statistics`: normalize with the statistics the run recorded rather than check that
    `train_images` have them (a teacher labelling other images than it trained on)."""
    meta = weights_meta(run_dir)
    statistics = (np.array(meta["mean"]), np.array(meta["std"])) if own_statistics else None
    model = build_model(replace(config, precision="float32"), train_images, statistics)
    load_network_weights(model, Path(run_dir) / WEIGHTS)
    if not own_statistics:
        mean, std = channel_stats(train_images)
        if not (np.allclose(mean, meta["mean"], rtol=1e-6) and np.allclose(std, meta["std"], rtol=1e-6)):
            raise ValueError(f"{run_dir} was trained on other images than these (channel statistics differ); "
                             "pass the data it was trained on")
    return model, meta
