"""Benchmark a training recipe from scratch: wall time and test accuracy per epoch.

    python -m training.bench --config fast [--precision mixed_bfloat16] [--target 0.90]
    KERAS_BACKEND=jax python -m training.bench --config default      # a GPU machine with JAX

Wall time counts training steps only (XLA compilation included); the per-epoch test evaluation
is reported, not counted, and is never used to steer training. The machine's load average is
printed because a busy machine slows every epoch.
"""

import argparse
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import keras

from training.configs import CONFIGS, PRECISIONS, get_config
from training.train import train


def device_names():
    if keras.backend.backend() == "jax":
        import jax
        return ", ".join(str(d) for d in jax.devices())
    import tensorflow as tf
    return ", ".join(d.name for d in tf.config.list_logical_devices())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fast", choices=sorted(CONFIGS))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--data", default="data")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--run-dir", default=None, help="default: runs/bench-<config> (started afresh)")
    args = parser.parse_args(argv)
    config = get_config(args.config, epochs=args.epochs, precision=args.precision)
    run_dir = Path(args.run_dir or f"runs/bench-{config.name}")
    shutil.rmtree(run_dir, ignore_errors=True)

    load_before, start = os.getloadavg()[0], time.perf_counter()
    evaluation, history = train(config, args.data, run_dir, verbose=0)
    total = time.perf_counter() - start

    print(f"\n{config.name}: {config.description} ({config.precision})")
    print(f"{'epoch':>5} {'train s':>8} {'wall s':>8} {'test acc':>9}")
    for row in history:
        print(f"{row['epoch']:>5} {row['epoch_seconds']:>8.1f} {row['wall_seconds']:>8.1f} {row['val_accuracy']:>9.4f}")
    reached = next((row for row in history if row["val_accuracy"] >= args.target), None)
    if evaluation is None:  # trained under JAX: `make export RUN=` evaluates it with TensorFlow
        evaluation = {"accuracy": history[-1]["val_accuracy"], "dataset": "the last epoch, without TTA"}
        config = replace(config, tta="none")
    print(f"final test accuracy {evaluation['accuracy']:.4f} on {evaluation['dataset']}"
          f"{'' if config.tta == 'none' else f' with {config.tta} TTA'}")
    print(f"backend {keras.backend.backend()}, devices: {device_names()}")
    print(f"training wall time {history[-1]['wall_seconds']:.0f} s; whole command {total:.0f} s "
          f"(data, evaluation, plots included)")
    if reached:
        print(f"{args.target:.0%} first reached: epoch {reached['epoch']} at {reached['wall_seconds']:.0f} s")
    elif evaluation["accuracy"] >= args.target:
        print(f"{args.target:.0%} reached by the final evaluation ({config.tta} TTA) after "
              f"{history[-1]['wall_seconds']:.0f} s of training")
    else:
        print(f"{args.target:.0%} not reached")
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (2 cores)")


if __name__ == "__main__":
    main()
