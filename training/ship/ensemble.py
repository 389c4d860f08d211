"""Average finished runs into one model: the mean of their logits, evaluated and exported with
the same test-time augmentation and export contract as a single run.

    python -m training.ship.ensemble runs/default runs/default-40ep --data data --out runs/ensemble
        [--tta flip] [--export-base models/cifar10]

Each member is rebuilt in float32 from its run directory as its own export would be (config.json,
the weights file, the channel statistics it trained on: members may have trained on different
images, a held-out split or --train-limit's slice). Networks trained differently make partly
different mistakes, so their average is right more often than either, for the sum of their
serving costs. <out> gets evaluation/ (the report) and members.json
(each member's run directory and configuration).
Every run with --export-base writes a new version.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import keras

from training.recipe.configs import TTA
from training.recipe.data import CifarDataError, dataset_label, ensure_cifar10, load_cifar10
from training.run.rundir import finished_meta, network_from_run, saved_config
from training.ship.evaluate import report
from training.ship.export import predict_keras


def load_member(run_dir, train_images, index):
    """The finished run in run_dir as a float32 Keras model named member<index>, and the run's
    configuration as saved."""
    config = saved_config(run_dir)
    finished_meta(run_dir, config)
    named = replace(config, name=f"member{index}")  # nested models need distinct names
    model, _ = network_from_run(named, run_dir, train_images, own_statistics=True)
    return model, json.loads((Path(run_dir) / "config.json").read_text())


def ensemble(members):
    pixels = keras.Input((32, 32, 3), name="pixels")
    return keras.Model(pixels, keras.layers.Average(name="logits")([m(pixels) for m in members]), name="ensemble")


def ensemble_card(members, tta, evaluation):
    """The exported ensemble's model card (GET /model): its members' configurations by name."""
    from training.ship.card import build_card  # TensorFlow: imported when an ensemble is exported
    names = [saved["name"] for _, saved in members]
    config = {"name": "ensemble", "description": f"the mean logits of {len(names)} runs: {', '.join(names)}",
              "epochs": max(saved["epochs"] for _, saved in members), "tta": tta}
    card = build_card(config, evaluation, time.strftime("%Y-%m-%d", time.gmtime()))
    card["training"]["members"] = [{"config": saved["name"], "epochs": saved["epochs"],
                                    "precision": saved.get("precision", "float32")} for _, saved in members]
    return card


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="runs/ensemble")
    parser.add_argument("--tta", choices=TTA, default="flip")
    parser.add_argument("--export-base", help="also export the ensemble as a new SavedModel version here")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("an ensemble needs at least two runs")
    try:
        train, test = load_cifar10(ensure_cifar10(args.data))
        members = [load_member(run, train.images, i) for i, run in enumerate(args.runs)]
    except (CifarDataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    model = ensemble([member for member, _ in members])
    out = Path(args.out)
    result = report(predict_keras(model, test.images, args.tta), test, out / "evaluation", dataset_label(args.data))
    record = {"tta": args.tta, "accuracy": result["accuracy"],
              "members": [{"run": run, "config": saved} for run, (_, saved) in zip(args.runs, members)]}
    if args.export_base:
        from training.ship.card import export_with_card
        path = export_with_card(model, args.export_base, ensemble_card(members, args.tta, result), tta=args.tta)
        record["export"] = {"path": str(path), "version": int(path.name)}
        print(f"exported {path}")
    (out / "members.json").write_text(json.dumps(record, indent=2))
    print(f"test accuracy {result['accuracy']:.4f} ({result['dataset']})")


if __name__ == "__main__":
    main()
