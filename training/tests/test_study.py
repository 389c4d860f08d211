import json
import statistics
import subprocess
import sys
import time

from training.lab.study import RESULT, run_study, study_runs
from training.recipe.configs import CONFIGS, SEED_STUDY
from training.tests.conftest import REPO, stop


def config_rows(table):
    """The first table's rows (one per configuration), as lists of cells."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| config |")) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_every_configuration_builds_documented_and_distinct():
    from training.recipe.configs import TrainConfig
    assert set(SEED_STUDY) <= set(CONFIGS)
    fields = [tuple(v for k, v in c.to_dict().items() if k not in ("name", "description", "reported_accuracy",
                                                                     "reported_epochs"))
              for c in CONFIGS.values()]
    assert len(set(fields)) == len(fields), "two configurations train the same thing"
    assert all(isinstance(c, TrainConfig) and c.description for c in CONFIGS.values())
    assert CONFIGS["final"].epochs == 275 and CONFIGS["final"].fine_tune_epochs == 25


def test_study_indexes_are_config_major_each_in_its_own_directory(tmp_path):
    runs = study_runs(["base1", "tiny"], [0, 1, 2], tmp_path)
    assert [(r.index, r.config, r.seed) for r in runs] == [
        (0, "base1", 0), (1, "base1", 1), (2, "base1", 2), (3, "tiny", 0), (4, "tiny", 1), (5, "tiny", 2)]
    # The configuration's own seed keeps the directory a study without seeds used.
    assert [r.run_dir.name for r in runs] == ["base1", "base1-seed1", "base1-seed2", "tiny", "tiny-seed1", "tiny-seed2"]
    assert [r.run_dir.name for r in study_runs(["base1", "tiny"], None, tmp_path)] == ["base1", "tiny"]


def test_the_whole_seed_study_runs_end_to_end_at_a_small_budget(small_data_dir, tmp_path, capsys):
    names = SEED_STUDY + ["fast"]
    # Trained as two halves at once: each `python -m training.lab.study` runs its configurations one after
    # the other in one process, as run_study would in this one; on two cores, where a run is mostly
    # one thread tracing and plotting, that takes two thirds of the time. The whole study then finds
    # every run finished (the results match its settings) and builds its table from them.
    budget = ["--epochs", "1", "--train-limit", "1024", "--test-limit", "64", "--data", str(small_data_dir),
              "--out", str(tmp_path)]
    halves = []
    for i, half in enumerate((names[:6], names[6:])):
        with open(tmp_path / f"half{i}.log", "w") as log:
            halves.append(subprocess.Popen([sys.executable, "-m", "training.lab.study", "--configs", ",".join(half),
                                            *budget], cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        for i, half in enumerate(halves):
            assert half.wait(timeout=600) == 0, (tmp_path / f"half{i}.log").read_text()[-3000:]
    finally:
        for half in halves:
            stop(half)
    table = run_study(names, tmp_path, epochs=1, data=small_data_dir, train_limit=1024, test_limit=64).read_text()
    assert capsys.readouterr().out.count("finished already") == len(names)
    rows = config_rows(table)
    assert [row[0] for row in rows] == names
    assert "| 82.37% |" in table and "90.87% (275 ep)" in table
    for name in names:
        assert (tmp_path / name / "history.png").is_file()
        assert (tmp_path / name / "evaluation" / "confusion_matrix.png").is_file()


def test_a_parallel_study_runs_each_index_once_reports_mean_and_std_and_skips_finished_runs(small_data_dir,
                                                                                          tmp_path):
    """make study JOBS=2: two processes, each the command a pod of the Indexed Job runs."""
    out = tmp_path / "study"
    command = [sys.executable, "-m", "training.lab.study", "--configs", "tiny", "--seeds", "0,1", "--epochs", "2",
               "--train-limit", "512", "--test-limit", "128", "--data", str(small_data_dir), "--out", str(out), "--jobs", "2"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # Both runs were started before either finished: they ran at the same time.
    log = [line for line in first.stdout.splitlines() if line.startswith("=== [")]
    assert [line.split(": ")[-1].split(" ")[0] for line in log[:2]] == ["started", "started"], log

    runs = study_runs(["tiny"], [0, 1], out)
    results = [json.loads((run.run_dir / RESULT).read_text()) for run in runs]
    for run, result in zip(runs, results):
        assert (result["index"], result["config"], result["seed"], result["epochs_trained"]) == (run.index, "tiny", run.seed, 2)
        assert json.loads((run.run_dir / "config.json").read_text())["seed"] == run.seed
    assert results[0]["test_accuracy"] != results[1]["test_accuracy"] or \
        (runs[0].run_dir / "metrics.csv").read_text() != (runs[1].run_dir / "metrics.csv").read_text()

    table = (out / "STUDY.md").read_text()
    (row,) = config_rows(table)
    accuracies = [100 * r["test_accuracy"] for r in results]
    assert row[0] == "tiny" and row[2] == "2/2" and row[3] == "2"
    assert row[4] == f"{statistics.mean(accuracies):.2f}% ± {statistics.stdev(accuracies):.2f}"
    assert "not finished" not in table

    stamps = [(run.run_dir / RESULT).stat().st_mtime_ns for run in runs]
    started = time.monotonic()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "started" not in second.stdout  # nothing to run again
    assert [(run.run_dir / RESULT).stat().st_mtime_ns for run in runs] == stamps
    assert (out / "STUDY.md").read_text() == table and time.monotonic() - started < 30
