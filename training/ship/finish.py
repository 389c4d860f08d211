"""Evaluate and export a run directory with TensorFlow, whichever backend trained it.

    python -m training.ship.finish RUN_DIR --data data [--export-base models/cifar10] [--tta flip]
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
from dataclasses import asdict, replace
from pathlib import Path

from training.recipe.configs import TTA
from training.recipe.data import CifarDataError, dataset_label
from training.recipe.images import load_image_folder
from training.ship.ood import METHODS, SHIPPED
from training.run.checkpoints import STATE, trained_date, write_atomically
from training.run.history import draw_history
from training.run.rundir import finished_meta, network_from_run, saved_config


def finish_run(config, run_dir, splits, dataset, export_base=None, ood_val=(), in_class_photos=(), ood_method=None):
    """Evaluation report (and, with export_base, a new version, once per TTA choice) of the run's
    weights file; returns the evaluation. A run with a validation split exports with the
    out-of-distribution head (training.ship.ood, `ood_method` or SHIPPED): fitted on its training
    images, its threshold on the held-out ones; `ood_val`, folders of images of none of the ten
    classes, only report what it flags, unless `in_class_photos`, folders of photos of the ten, are
    given too: then the threshold is the one that separates the two best (ood.choose_threshold)."""
    from training.ship.evaluate import write_evaluation  # TensorFlow's side
    from training.ship.ood import fit_head
    run_dir = Path(run_dir)
    if not (run_dir / "history.png").is_file() and (run_dir / STATE).is_file():
        draw_history(run_dir, config, json.loads((run_dir / STATE).read_text())["history"])
    model, _ = network_from_run(config, run_dir, splits.train.images)
    evaluation, temperature = write_evaluation(model, config, splits.test, run_dir / "evaluation", dataset,
                                               splits.validation)
    if export_base:
        ood = None
        if splits.validation is not None:
            ood = fit_head(ood_method or SHIPPED, model, splits.train, splits.validation, temperature,
                           images_of(ood_val), images_of(in_class_photos))
        export_once(model, config, run_dir, export_base, temperature, evaluation, ood)
    return evaluation


def images_of(folders):
    """Every image under `folders`, as the worker preprocesses an upload; None for no folders."""
    if not folders:
        return None
    import numpy as np
    return np.concatenate([load_image_folder(folder)[0] for folder in folders])


def export_once(model, config, run_dir, export_base, temperature=1.0, evaluation=None, ood=None):
    """One exported version per run and test-time augmentation: re-running a finished command
    adds no version; re-running it with another --tta exports that choice as a new version. `ood`:
    the out-of-distribution head it folds in (training.ship.ood.OodHead)."""
    record = run_dir / "export.json"
    exports = json.loads(record.read_text()) if record.exists() else {}
    if "path" in exports:  # an older record, without its TTA: taken to be the current choice
        exports = {config.tta: exports}
    if config.tta in exports:
        print(f"already exported: {exports[config.tta]['path']}")
        return
    from training.ship.card import build_card, export_with_card  # TensorFlow's side
    card = build_card(asdict(config), evaluation, trained_date(run_dir), ood=ood) if evaluation else None
    path = export_with_card(model, export_base, card, tta=config.tta, temperature=temperature, ood=ood)
    exports[config.tta] = {"path": str(path), "version": int(path.name)}
    write_atomically(record, json.dumps(exports))
    print(f"exported {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", default="data")
    parser.add_argument("--export-base", help="export a new SavedModel version under this path")
    parser.add_argument("--tta", choices=TTA, help="test-time augmentation (default: the configuration's)")
    parser.add_argument("--ood-val", action="append", default=[], metavar="FOLDER",
                        help="images of none of the ten classes (repeatable): the model card says what share "
                        "the out-of-distribution threshold flags")
    parser.add_argument("--in-class-photos", action="append", default=[], metavar="FOLDER",
                        help="photos of the ten classes (repeatable): with --ood-val, the threshold is the one "
                        "that tells the two apart best, flagging at most 5%% of the held-out images")
    parser.add_argument("--ood-method", choices=METHODS, help=f"the out-of-distribution score (default {SHIPPED})")
    args = parser.parse_args(argv)
    import keras
    if keras.backend.backend() != "tensorflow":
        sys.exit("error: export goes through TensorFlow: run with KERAS_BACKEND=tensorflow (the default)")
    from training.run.loop import load_splits
    run_dir = Path(args.run_dir)
    try:
        config = saved_config(run_dir)
        config = replace(config, tta=args.tta or config.tta)
        meta = finished_meta(run_dir, config)
        splits = load_splits(config, args.data, meta.get("train_limit"), meta.get("test_limit"))
        if args.in_class_photos and not args.ood_val:
            raise ValueError("--in-class-photos choose the threshold against --ood-val: give both")
        evaluation = finish_run(config, run_dir, splits, dataset_label(args.data), args.export_base, args.ood_val,
                                args.in_class_photos, args.ood_method)
    except (CifarDataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{run_dir} (trained under {meta['backend']}): test accuracy {evaluation['accuracy']:.4f} "
          f"({evaluation['dataset']}{'' if config.tta == 'none' else f', {config.tta} TTA'})")


if __name__ == "__main__":
    main()
