"""Run configurations x seeds and compare them in a markdown table (mean ± std over seeds), with
the seed's numbers.

    python -m training.lab.study --configs base1,base2,base3 --seeds 0,1,2 --epochs 20 --out runs/study
        [--jobs 2]                  # as many runs at once, one process each
    python -m training.lab.study ... --index-from-env   # the run JOB_COMPLETION_INDEX names, alone

A study is a list of runs, and index i of it is always the same run (`study_runs`): configuration
i // S, seed i % S of the S seeds, in its own run directory under --out. The Kubernetes Indexed
Job (`make study-k8s`) runs index JOB_COMPLETION_INDEX in each pod with --index-from-env;
`--jobs N` runs the same indexes here, N processes at a time, each with its JOB_COMPLETION_INDEX.
Each run resumes from its last checkpoint like any training run, and a finished run (its
study-result.json written) is not run again: a killed study, re-run, does only what is left, and
re-running a finished one only rebuilds STUDY.md. Every finished run rebuilds STUDY.md from the
results present, so the table is complete once the last run is.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.recipe.configs import CONFIGS, SEED_STUDY, get_config

RESULT = "study-result.json"
TABLE = "STUDY.md"


@dataclass(frozen=True)
class StudyRun:
    index: int
    config: str
    seed: int
    run_dir: Path


def study_runs(configs, seeds, out) -> list[StudyRun]:
    """Every run of a study, index i being configuration i // len(seeds), seed i % len(seeds).
    `seeds` None: each configuration's own seed. A run with its configuration's own seed trains in
    out/<config> (where a study without seeds put it); other seeds in out/<config>-seed<seed>."""
    runs = []
    for name in configs:
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; choose from: {', '.join(CONFIGS)}")
        for seed in seeds if seeds else [CONFIGS[name].seed]:
            directory = name if seed == CONFIGS[name].seed else f"{name}-seed{seed}"
            runs.append(StudyRun(len(runs), name, int(seed), Path(out) / directory))
    if len({r.run_dir for r in runs}) != len(runs):
        raise ValueError("a configuration or seed is listed twice")
    return runs


def run_config(run, epochs=None):
    return get_config(run.config, epochs=epochs, seed=run.seed)


def read_result(run, epochs=None, train_limit=None, test_limit=None):
    """The run's result if it finished with these settings, else None."""
    path = run.run_dir / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    wanted = {"config": run.config, "seed": run.seed, "epochs": run_config(run, epochs).epochs,
              "train_limit": train_limit, "test_limit": test_limit}
    return result if all(result.get(k) == v for k, v in wanted.items()) else None


def run_one(run, epochs=None, data="data", train_limit=None, test_limit=None):
    """Train (or resume) one run of the study and record its result; a finished run is not redone."""
    result = read_result(run, epochs, train_limit, test_limit)
    if result:
        print(f"=== [{run.index}] {run.config} seed {run.seed}: finished already ({run.run_dir})", flush=True)
        return result
    import keras
    from training.train import train
    config = run_config(run, epochs)
    print(f"=== [{run.index}] {run.config} seed {run.seed} ({config.epochs} epochs) -> {run.run_dir}", flush=True)
    keras.backend.clear_session()
    evaluation, history = train(config, data, run.run_dir, train_limit=train_limit, test_limit=test_limit, verbose=0)
    result = {"index": run.index, "config": run.config, "seed": run.seed, "epochs": config.epochs,
              "train_limit": train_limit, "test_limit": test_limit, "epochs_trained": len(history),
              # None where the backend leaves evaluation to TensorFlow (training.ship.finish)
              "test_accuracy": evaluation["accuracy"] if evaluation else None,
              "last_epoch_accuracy": history[-1].get("val_accuracy") if history else None,
              "best_epoch_accuracy": max((row.get("val_accuracy", 0) for row in history), default=None),
              "minutes": (history[-1]["wall_seconds"] if history else 0) / 60}
    write_atomically(run.run_dir / RESULT, json.dumps(result, indent=2))
    return result


def write_atomically(path, text):
    """train.write_atomically, without importing the training stack (a parent of --jobs needs none)."""
    tmp = Path(f"{path}.{secrets.token_hex(4)}.tmp")  # pods writing at once on a shared volume: one each
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the table ------------------------------------------------------------------------------

def mean_std(values, scale=100):
    """'72.31% ± 0.45' (sample standard deviation over n >= 2 values, in points), '72.31%' for one."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.mean(values):.2f}% ± {statistics.stdev(values):.2f}"


def reported(config):
    if not config.reported_accuracy:
        return ""
    return f"{config.reported_accuracy:.2f}%" + (f" ({config.reported_epochs} ep)" if config.reported_epochs else "")


def study_table(runs, results, epochs=None, train_limit=None, test_limit=None):
    """STUDY.md: one row per configuration (mean ± std over its finished seeds), then one per run."""
    seeds = sorted({r.seed for r in runs})
    scope = (f"{train_limit or 50000} training images, {test_limit or 10000} test images; "
             f"epoch budget {epochs or 'as configured'}; seeds {', '.join(map(str, seeds))}")
    rows = []
    for name in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == name]
        done = [results[r.index] for r in mine if r.index in results]
        config = get_config(name, epochs=epochs)
        trained = sorted({d["epochs_trained"] for d in done})
        test = mean_std([d["test_accuracy"] for d in done])
        if done and all(d["test_accuracy"] is None for d in done):
            test = "— (last epoch " + mean_std([d["last_epoch_accuracy"] for d in done]) + ")"
        minutes = f"{statistics.mean(d['minutes'] for d in done):.1f}" if done else "—"
        rows.append(f"| {name} | {config.description} | {len(done)}/{len(mine)} "
                    f"| {'/'.join(map(str, trained)) or '—'} | {test} "
                    f"| {mean_std([d['best_epoch_accuracy'] for d in done])} | {minutes} | {reported(config)} |")
    per_run = [f"| {r.index} | {r.config} | {r.seed} | `{r.run_dir.name}` | "
               + (f"{mean_std([results[r.index]['test_accuracy']])} | {mean_std([results[r.index]['best_epoch_accuracy']])} "
                  f"| {results[r.index]['minutes']:.1f} |" if r.index in results else "not finished | | |")
               for r in runs]
    missing = [r.index for r in runs if r.index not in results]
    return "\n".join([
        f"# Study ({scope})", "",
        "Final test accuracy is after the last epoch (with test-time augmentation where the configuration "
        "uses it); best is the best per-epoch test accuracy, shown for comparison with the seed, never used "
        "for selection. With several seeds a cell is the mean ± the sample standard deviation over the "
        "seeds (in points); minutes are the mean training time of a run.", "",
        *([f"**{len(missing)} of {len(runs)} runs not finished** (indexes {', '.join(map(str, missing))}).", ""]
          if missing else []),
        "| config | what | seeds | epochs | test acc | best epoch | minutes | seed reported |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "| index | config | seed | run directory | test acc | best epoch | minutes |",
        "|---|---|---|---|---|---|---|", *per_run, ""])


def write_table(runs, out, epochs=None, train_limit=None, test_limit=None):
    """Rebuild STUDY.md from the results present (atomic replace). Runs finishing at the same time
    on a shared volume each rebuild it; re-reading the results after writing, and writing again
    if more have appeared, leaves the last write with every result written before it."""
    Path(out).mkdir(parents=True, exist_ok=True)
    while True:
        results = {r.index: res for r in runs if (res := read_result(r, epochs, train_limit, test_limit))}
        table = study_table(runs, results, epochs, train_limit, test_limit)
        write_atomically(Path(out) / TABLE, table)
        if {r.index for r in runs if read_result(r, epochs, train_limit, test_limit)} == set(results):
            return Path(out) / TABLE, table


# --- running a study ------------------------------------------------------------------------

def index_command(args_for_index):
    return [sys.executable, "-m", "training.lab.study", *args_for_index, "--index-from-env"]


def run_parallel(runs, jobs, cli_args, epochs=None, train_limit=None, test_limit=None):
    """The unfinished runs, `jobs` processes at a time, each the command a pod of the Indexed Job
    runs (--index-from-env, JOB_COMPLETION_INDEX set); returns the indexes that failed."""
    pending = [r for r in runs if not read_result(r, epochs, train_limit, test_limit)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running, failed = {}, []
    try:
        _schedule(pending, running, failed, jobs, threads, cli_args)
    finally:  # interrupted (Ctrl-C): stop the runs; each resumes from its checkpoint next time
        for process, log, _ in running.values():
            process.terminate()
            process.wait()
            log.close()
    return failed


def _schedule(pending, running, failed, jobs, threads, cli_args):
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            # Each process gets its share of the cores instead of all of them.
            env = {**os.environ, "JOB_COMPLETION_INDEX": str(run.index),
                   "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS", str(threads)),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
            run.run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run.run_dir / "study.log", "a")
            running[run.index] = (subprocess.Popen(index_command(cli_args), env=env, stdout=log,
                                                   stderr=subprocess.STDOUT), log, run)
            print(f"=== [{run.index}] {run.config} seed {run.seed}: started (log {run.run_dir / 'study.log'})",
                  flush=True)
        for index, (process, log, run) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[index]
                outcome = "done" if process.returncode == 0 else f"failed (exit {process.returncode})"
                print(f"=== [{index}] {run.config} seed {run.seed}: {outcome}", flush=True)
                if process.returncode:
                    failed.append(index)
        time.sleep(0.2)


def run_study(names, out, epochs=None, data="data", train_limit=None, test_limit=None, seeds=None, jobs=1):
    """Every run of the study (resuming, skipping finished ones), then STUDY.md; returns its path."""
    runs = study_runs(names, seeds, out)
    failed = []
    if jobs > 1:
        failed = run_parallel(runs, jobs, cli_args(names, out, epochs, data, train_limit, test_limit, seeds),
                              epochs, train_limit, test_limit)
    else:
        for run in runs:
            run_one(run, epochs, data, train_limit, test_limit)
    path, table = write_table(runs, out, epochs, train_limit, test_limit)
    print(table)
    if failed:
        raise RuntimeError(f"study runs {failed} failed: see study.log in their run directories")
    return path


def cli_args(names, out, epochs, data, train_limit, test_limit, seeds):
    args = ["--configs", ",".join(names), "--out", str(out), "--data", str(data)]
    for option, value in (("--epochs", epochs), ("--train-limit", train_limit), ("--test-limit", test_limit)):
        if value:
            args += [option, str(value)]
    if seeds:
        args += ["--seeds", ",".join(map(str, seeds))]
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(SEED_STUDY), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", help="comma-separated seeds, every configuration trained once with each "
                        "(default: each configuration's own seed)")
    parser.add_argument("--epochs", type=int, help="epoch budget for every configuration (default: each one's)")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each")
    parser.add_argument("--index-from-env", action="store_true",
                        help="run only index JOB_COMPLETION_INDEX of the study (a pod of the Indexed Job)")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    try:
        if args.index_from_env:
            runs = study_runs(names, seeds, args.out)
            if not os.environ.get("JOB_COMPLETION_INDEX", "").isdigit():
                sys.exit("error: --index-from-env needs JOB_COMPLETION_INDEX (set in each pod of an Indexed Job)")
            index = int(os.environ["JOB_COMPLETION_INDEX"])
            if not 0 <= index < len(runs):
                sys.exit(f"error: JOB_COMPLETION_INDEX {index} is not an index of this study's {len(runs)} runs")
            run_one(runs[index], args.epochs, args.data, args.train_limit, args.test_limit)
            print(write_table(runs, args.out, args.epochs, args.train_limit, args.test_limit)[1])
            return
        run_study(names, args.out, args.epochs, args.data, args.train_limit, args.test_limit, seeds, args.jobs)
    except (ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
