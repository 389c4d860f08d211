"""A GPU session's plan (training/lab/gpu_session.sh, the bundle's session.sh) at toy size on the CPU,
under JAX from the bundle as a GPU machine runs it: the teacher, then a student distilled from
the teacher's run directory, the port and the study, at once; packed into parts for the trip
back; unpacked and finished here with TensorFlow."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from training.tests.conftest import REPO

PLAN = {"TEACHER": "tiny", "STUDENT": "tiny", "PORT": "tiny", "STUDY": "tiny", "STUDENT_EPOCHS": "2",
        "OPTIONS": "--train-limit 1024 --test-limit 256"}


@pytest.fixture(scope="module")
def session(bundle, tmp_path_factory):
    out, _, work = bundle
    root = tmp_path_factory.mktemp("session")
    env = {**os.environ, **PLAN, "PYTHON": sys.executable, "BUNDLE_WORK": str(work)}
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run([str(out / "session.sh"), str(root / "runs"), "8", str(root / "pack")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    back = root / "back"
    parts = sorted((root / "pack").iterdir())
    with open(root / "session.tar", "wb") as joined:
        for part in parts:
            joined.write(part.read_bytes())
    with tarfile.open(root / "session.tar") as archive:
        archive.extractall(back, filter="data")
    return root, back, parts, result.stdout


def test_every_part_runs_to_its_end_and_comes_back_without_the_finished_runs_checkpoints(session):
    root, back, parts, log = session
    assert all(part.stat().st_size <= 15_000_000 for part in parts)
    for run in ("teacher", "student-2", "port", "study/tiny"):
        assert (back / run / "weights.float16.npz").is_file(), run
        assert not (back / run / "checkpoints").exists(), run
        assert json.loads((back / run / "state.json").read_text())["epoch"] == json.loads(
            (back / run / "config.json").read_text())["epochs"]
    assert json.loads((back / "study/tiny/study-result.json").read_text())["epochs_trained"] == 1
    for name in ("teacher", "student-2", "port", "study"):
        assert f"{name}: exit 0" in log
    assert "student-2: start" in log.split("teacher: exit 0")[1], "the student starts after its teacher"


def test_the_student_learned_from_the_teachers_run_what_tensorflow_computes_of_it(session, data_dir):
    """The soft targets JAX computed from the teacher's run directory are the log-softmax of the
    flip-averaged logits that TensorFlow's export of that run serves."""
    from training.recipe.data import load_cifar10
    from training.run.distill import run_probabilities
    root, back, _, _ = session
    student = json.loads((back / "student-2" / "config.json").read_text())
    assert student["teacher"] == str(root / "runs" / "teacher") and student["epochs"] == 2
    with np.load(back / "student-2" / "teacher-logits.npz") as cache:
        logits = cache["logits"]
    train, _ = load_cifar10(data_dir)
    assert logits.shape == (len(train.labels), 10)
    here = run_probabilities(back / "teacher", train.images[:300], 100, lambda done: None)
    served = np.exp(logits[:300] - logits[:300].max(axis=1, keepdims=True))
    assert np.allclose(served / served.sum(axis=1, keepdims=True), here, atol=1e-4)


def test_a_student_that_came_back_exports_here_with_tensorflow(session, data_dir):
    root, back, _, _ = session
    result = subprocess.run([sys.executable, "-m", "training.ship.finish", str(back / "student-2"), "--data", str(data_dir),
                             "--export-base", str(root / "models")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained under jax" in result.stdout and (root / "models" / "1" / "saved_model.pb").is_file()
