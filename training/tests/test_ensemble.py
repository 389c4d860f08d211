"""The ensemble CLI as users run it, on two tiny runs trained on different slices of CIFAR-10."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from training.export import existing_versions, predict_exported
from training.tests.conftest import REPO, run_training


def run_ensemble(*args):
    return subprocess.run([sys.executable, "-m", "training.ensemble", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    for name, limit in [("a", 1024), ("b", 512)]:
        result = run_training("--config", "tiny", "--data", data_dir, "--run-dir", root / name,
                              "--train-limit", limit, "--test-limit", 64)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_the_exported_ensemble_serves_the_softmax_of_its_members_mean_logits(two_runs, data_dir):
    import tensorflow as tf
    from training.data import load_cifar10
    from training.ensemble import load_member
    from training.export import averaged_logits
    root = two_runs
    result = run_ensemble(root / "a", root / "b", "--data", data_dir, "--out", root / "out",
                          "--export-base", root / "models")
    assert result.returncode == 0, result.stderr[-3000:]
    assert existing_versions(root / "models") == [1]
    record = json.loads((root / "out/members.json").read_text())
    evaluation = json.loads((root / "out/evaluation/evaluation.json").read_text())
    assert record["tta"] == "flip" and record["accuracy"] == evaluation["accuracy"]
    assert [m["run"] for m in record["members"]] == [str(root / "a"), str(root / "b")]
    assert record["members"][0]["config"]["name"] == "tiny"
    assert evaluation["images"] == 10000 and np.sum(evaluation["confusion_matrix"]) == 10000

    train, test = load_cifar10(data_dir)
    images = test.images[:64]
    pixels = tf.constant(images, tf.float32)
    members = [averaged_logits(load_member(root / name, train.images, i)[0], pixels, "flip").numpy()
               for i, name in enumerate("ab")]
    served = predict_exported(root / "models/1", images)
    assert np.allclose(served, tf.nn.softmax((members[0] + members[1]) / 2).numpy(), atol=1e-3)
    for logits in members:  # and not simply one of them
        assert np.abs(served - tf.nn.softmax(logits).numpy()).max() > 1e-3


def test_an_unfinished_run_or_a_missing_one_is_refused_by_name(two_runs, data_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(two_runs / "a", unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "epochs": 3}))
    result = run_ensemble(two_runs / "b", unfinished, "--data", data_dir, "--out", tmp_path / "out")
    assert result.returncode != 0 and f"{unfinished} is not finished (1 of 3 epochs)" in result.stderr
    result = run_ensemble(tmp_path / "nowhere", two_runs / "b", "--data", data_dir, "--out", tmp_path / "out")
    assert result.returncode != 0 and "nowhere is not a run directory" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
