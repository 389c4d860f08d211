"""Evaluate and export a run directory with TensorFlow, whichever backend trained it.

    python -m training.finish RUN_DIR --data data [--export-base models/cifar10] [--tta flip]
    make export RUN=runs/default

A run trained under JAX (on a GPU machine without TensorFlow, say) ends with its weights file,
weights.float16.npz. Here that file is loaded into the network built by TensorFlow, evaluated on
the test split (after fitting the softmax temperature on the validation split, where the
configuration holds one out), and exported as the next model version: the same contract, the
same evaluation/ report and export.json as a run trained here. The data must be the data it was
trained on: the file records the training images' channel statistics, and they are checked.
"""

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from training.configs import TTA, TrainConfig
from training.data import CifarDataError, channel_stats, dataset_label
from training.models import WEIGHTS, build_model, load_network_weights


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


def finish_run(config, run_dir, splits, dataset, export_base=None, ood_val=None):
    """Evaluation report (and, with export_base, a new version, once per TTA choice) of the run's
    weights file; returns the evaluation. A run with a validation split exports with the
    out-of-distribution head (training.ood): fitted on its training images, its threshold on the
    held-out ones; `ood_val`, a folder of images none of the ten classes, only reports what it flags."""
    from training.evaluate import write_evaluation
    from training.ood import SHIPPED, fit_head, load_image_folder
    from training.train import STATE, draw_history, export_once
    run_dir = Path(run_dir)
    if not (run_dir / "history.png").is_file() and (run_dir / STATE).is_file():
        draw_history(run_dir, config, json.loads((run_dir / STATE).read_text())["history"])
    model, _ = network_from_run(config, run_dir, splits.train.images)
    evaluation, temperature = write_evaluation(model, config, splits.test, run_dir / "evaluation", dataset,
                                               splits.validation)
    if export_base:
        ood = None
        if splits.validation is not None:
            ood = fit_head(SHIPPED, model, splits.train, splits.validation, temperature,
                           load_image_folder(ood_val)[0] if ood_val else None)
        export_once(model, config, run_dir, export_base, temperature, evaluation, ood)
    return evaluation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", default="data")
    parser.add_argument("--export-base", help="export a new SavedModel version under this path")
    parser.add_argument("--tta", choices=TTA, help="test-time augmentation (default: the configuration's)")
    parser.add_argument("--ood-val", help="a folder of images of none of the ten classes: the model card says "
                        "what share the out-of-distribution threshold flags")
    args = parser.parse_args(argv)
    import keras
    if keras.backend.backend() != "tensorflow":
        sys.exit("error: export goes through TensorFlow: run with KERAS_BACKEND=tensorflow (the default)")
    from training.train import load_splits
    run_dir = Path(args.run_dir)
    try:
        config = saved_config(run_dir)
        config = replace(config, tta=args.tta or config.tta)
        meta = finished_meta(run_dir, config)
        splits = load_splits(config, args.data, meta.get("train_limit"), meta.get("test_limit"))
        evaluation = finish_run(config, run_dir, splits, dataset_label(args.data), args.export_base, args.ood_val)
    except (CifarDataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{run_dir} (trained under {meta['backend']}): test accuracy {evaluation['accuracy']:.4f} "
          f"({evaluation['dataset']}{'' if config.tta == 'none' else f', {config.tta} TTA'})")


if __name__ == "__main__":
    main()
