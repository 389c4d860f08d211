"""Train one configuration into a run directory, resuming from its last epoch checkpoint.

    python -m training.train --config fast --data data --run-dir runs/fast [--epochs N]
        [--export-base models/cifar10]

The run directory gets: config.json, metrics.csv (one row per epoch), tensorboard/, history.png,
checkpoints/ (the last completed epoch), weights.float16.npz (the trained network, what export
needs), evaluation/ (report, confusion matrix, misclassified images) and, with --export-base, the
exported SavedModel's path in export.json. Killed at any point, the same command continues from
the last completed epoch and ends where an uninterrupted run would. The test split is only ever
evaluated, never trained on.

It reads top to bottom: the recipe (training.recipe: data, configuration, network) is fit by the
loop (training.run: optimizer, checkpoints, distillation, devices), then shipped (training.ship:
evaluation, calibration, export, model card). The same loop runs under both Keras backends:
KERAS_BACKEND=tensorflow (the default) or jax. Evaluation and export always go through TensorFlow:
under JAX the run ends with its weights file, and `make export RUN=<run dir>` (python -m
training.ship.finish) evaluates and exports it on a machine with TensorFlow.
"""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import keras

from training.recipe.configs import CONFIGS, PRECISIONS, TTA, get_config
from training.recipe.data import CifarDataError, dataset_label
from training.run.distribute import from_environment
from training.run.loop import fit


def train(config, data, run_dir, export_base=None, train_limit=None, test_limit=None, verbose=None,
          touch_test=True, placement=None):
    """Train (or resume) `config` in run_dir, then evaluate it on the test split and, with
    export_base, export it; returns (evaluation, per-epoch history). Without touch_test (a trial
    that chooses settings on the validation split) there is no test evaluation and no export, and
    the evaluation is None. Under a backend other than TensorFlow the evaluation is None too, unless
    a TensorFlow process can export it: the run ends with its weights file, for `make export`. A
    worker other than the chief of several (training.run.distribute) returns (None, history)."""
    backend = keras.backend.backend()
    if export_base and backend != "tensorflow" and importlib.util.find_spec("tensorflow") is None:
        raise ValueError(f"export goes through TensorFlow, which is not installed here: train without "
                         f"--export-base, then `make export RUN={run_dir}` where it is")
    if not touch_test and (not config.validation_size or export_base):
        raise ValueError("a trial that leaves the test split alone needs a validation split and no export")
    splits, history, run_dir = fit(config, data, run_dir, train_limit, test_limit, verbose, placement)
    if run_dir is None or not touch_test:
        return None, history
    if backend != "tensorflow":
        if not export_base:
            print(f"trained under {backend}; evaluate and export with TensorFlow: make export RUN={run_dir}")
            return None, history
        return finish_in_tensorflow(run_dir, data, export_base, config.tta), history
    from training.ship.finish import finish_run  # TensorFlow's side: evaluation through the export's function
    return finish_run(config, run_dir, splits, dataset_label(data), export_base), history


def finish_in_tensorflow(run_dir, data, export_base, tta):
    """Evaluation and export of a run trained under another backend, by training.ship.finish in a
    TensorFlow process (a process has one Keras backend); returns the evaluation."""
    import subprocess
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    subprocess.run([sys.executable, "-m", "training.ship.finish", str(run_dir), "--data", str(data),
                    "--export-base", str(export_base), "--tta", tta], env=env, check=True)
    return json.loads((Path(run_dir) / "evaluation" / "evaluation.json").read_text())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fast", choices=sorted(CONFIGS))
    parser.add_argument("--epochs", type=int, help="epoch budget (default: the configuration's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--tta", choices=TTA, help="test-time augmentation in evaluation and export "
                        "(default: the configuration's; a finished run can be re-evaluated with another)")
    parser.add_argument("--precision", choices=PRECISIONS, help="mixed_bfloat16 trains about twice as fast "
                        "on CPUs with AMX and on GPUs; evaluation and export stay float32 "
                        "(default: the configuration's)")
    parser.add_argument("--data", default="data", help="data dir, cifar-10-batches-py/ or the tarball")
    parser.add_argument("--run-dir", help="default: runs/<config>")
    parser.add_argument("--export-base", help="also export a new SavedModel version under this path")
    parser.add_argument("--validation-size", type=int, help="training images held out for monitoring and "
                        "calibration (default: the configuration's)")
    parser.add_argument("--teacher", help="distil from this exported SavedModel version (default: the configuration's)")
    parser.add_argument("--distill-alpha", type=float, help="weight of the hard-label loss when distilling")
    parser.add_argument("--distill-temperature", type=float, help="softmax temperature of the distillation loss")
    parser.add_argument("--outliers", help="outlier exposure: a folder of images of none of the ten classes "
                        "(default: the configuration's; data/outliers is built by python -m training.lab.ood_sets)")
    parser.add_argument("--outlier-photos", help="photos of the ten classes to join the outliers, one folder per "
                        "class name (default: the configuration's; \"\" for none)")
    parser.add_argument("--outlier-batch", type=int, help="outliers (and photos) added to every training batch")
    parser.add_argument("--outlier-weight", type=float, help="weight of the outliers' loss")
    parser.add_argument("--train-limit", type=int, help="train on the first N training images only")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--deterministic", action="store_true", help="deterministic TF ops (slower)")
    parser.add_argument("--trial", action="store_true", help="choosing settings: report the validation "
                        "split only, leave the test split untouched, export nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # XLA on the CPU, JAX's backend here, is deterministic as it is
        tf.config.experimental.enable_op_determinism()
    config = get_config(args.config, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, tta=args.tta, precision=args.precision,
                        validation_size=args.validation_size, teacher=args.teacher, distill_alpha=args.distill_alpha,
                        distill_temperature=args.distill_temperature, outliers=args.outliers,
                        outlier_photos=args.outlier_photos, outlier_batch=args.outlier_batch,
                        outlier_weight=args.outlier_weight)
    try:
        placement = from_environment()  # several GPUs, or TF_CONFIG's workers: one run over all of them
        print(f"placement: {placement.describe()}", flush=True)
        evaluation, history = train(config, args.data, args.run_dir or f"runs/{config.name}", args.export_base,
                                    args.train_limit, args.test_limit, touch_test=not args.trial, placement=placement)
    except (CifarDataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.trial:
        print(f"validation accuracy {history[-1]['val_accuracy']:.4f} (trial: test split not evaluated)")
        return
    if evaluation is None:
        print(f"last epoch: {history[-1]['val_accuracy']:.4f} {'validation' if config.validation_size else 'test'} "
              f"accuracy without test-time augmentation" if history else "no epoch trained")
        return
    print(f"test accuracy {evaluation['accuracy']:.4f} ({evaluation['dataset']})")


if __name__ == "__main__":
    main()
