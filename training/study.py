"""Run a list of configurations and compare them in a markdown table, with the seed's numbers.

    python -m training.study --configs base1,base2,base3 --epochs 20 --out runs/study
"""

import argparse
from pathlib import Path

import keras

from training.configs import CONFIGS, SEED_STUDY, get_config
from training.train import train


def study_row(config, evaluation, history):
    best = max((row.get("val_accuracy", 0) for row in history), default=float("nan"))
    seconds = history[-1]["wall_seconds"] if history else 0
    reported = (f"{config.reported_accuracy:.2f}%" + (f" ({config.reported_epochs} ep)" if config.reported_epochs else "")
                if config.reported_accuracy else "")
    return (f"| {config.name} | {config.description} | {len(history)} | {evaluation['accuracy']:.2%} "
            f"| {best:.2%} | {seconds / 60:.1f} | {reported} |")


def run_study(names, out, epochs=None, data="data", train_limit=None, test_limit=None):
    out = Path(out)
    rows = []
    for name in names:
        config = get_config(name, epochs=epochs)
        run_dir = out / name
        print(f"=== {name} ({config.epochs} epochs) -> {run_dir}", flush=True)
        keras.backend.clear_session()
        evaluation, history = train(config, data, run_dir, train_limit=train_limit, test_limit=test_limit,
                                    verbose=0)
        rows.append(study_row(config, evaluation, history))
    scope = (f"{train_limit or 50000} training images, {test_limit or 10000} test images; "
             f"epoch budget {epochs or 'as configured'}")
    table = "\n".join([
        f"# Study ({scope})", "",
        "Final test accuracy is after the last epoch (with test-time augmentation where the configuration "
        "uses it); best is the best per-epoch test accuracy, shown for comparison with the seed, never used for selection.", "",
        "| config | what | epochs | test acc | best epoch | minutes | seed reported |",
        "|---|---|---|---|---|---|---|", *rows, ""])
    (out / "STUDY.md").write_text(table)
    print(table)
    return out / "STUDY.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(SEED_STUDY), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--epochs", type=int, help="epoch budget for every configuration (default: each one's)")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--test-limit", type=int)
    args = parser.parse_args(argv)
    run_study(args.configs.split(","), args.out, args.epochs, args.data, args.train_limit, args.test_limit)


if __name__ == "__main__":
    main()
