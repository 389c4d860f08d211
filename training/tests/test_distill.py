"""Distillation and calibration through the training CLI, on a real slice of CIFAR-10, with a real
exported teacher."""

import json

import numpy as np
import pytest

from training.tests.conftest import SMALL_TRAIN
from training.tests.conftest import TINY_SLICE as SLICE
from training.tests.conftest import killed_resumed_and_straight, run_training, start_training

STUDENT = ["--config", "tiny", "--validation-size", 256, *SLICE]


@pytest.fixture(scope="module")
def teacher(tiny_run):
    """The session's exported tiny run (conftest): any exported version can teach."""
    root, _ = tiny_run
    return root / "models" / "1"


@pytest.fixture(scope="module")
def student(small_data_dir, teacher, tmp_path_factory):
    """Trained on a slice of small_data_dir, whose every training image (SMALL_TRAIN, twice the
    slice) the teacher labels: the cache holds the whole training split, not the slice."""
    root = tmp_path_factory.mktemp("student")
    result = run_training(*STUDENT, "--teacher", teacher, "--data", small_data_dir, "--run-dir", root / "run",
                          "--export-base", root / "models")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_the_soft_targets_are_the_teachers_served_log_probabilities_before_its_calibration(
        student, teacher, small_data_dir, tmp_path):
    import shutil
    from training.recipe.data import load_cifar10
    from training.recipe.contract import predict_exported, served_temperature
    from training.run.distill import compute_teacher_logits
    root, _ = student
    train, _ = load_cifar10(small_data_dir)
    with np.load(root / "run" / "teacher-logits.npz") as cached:
        logits = cached["logits"]
    assert logits.shape == (SMALL_TRAIN, 10) and SMALL_TRAIN > 1024  # every image, beyond the slice
    served = predict_exported(teacher, train.images)
    temperature = served_temperature(teacher)
    scaled = np.exp(logits / temperature)
    assert np.allclose(scaled / scaled.sum(axis=1, keepdims=True), served, atol=1e-5)
    # A sharper calibration in the card: the targets undo it, times the card's temperature.
    sharper = tmp_path / "teacher"
    shutil.copytree(teacher, sharper)
    card_path = sharper / "assets.extra" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["training"]["temperature"] = 0.5
    card_path.write_text(json.dumps(card))
    images = train.images[:200]
    assert np.allclose(compute_teacher_logits(sharper, images), 0.5 * np.log(np.maximum(served[:200], 1e-30)), atol=1e-4)


def test_a_student_monitors_the_held_out_images_and_the_test_split_only_reports(student):
    root, result = student
    assert "val acc" in result.stdout and "test acc" not in result.stdout.split("test accuracy")[0]
    evaluation = json.loads((root / "run/evaluation/evaluation.json").read_text())
    assert evaluation["images"] == 256 and evaluation["validation"]["images"] == 256
    assert set(evaluation["validation"]["accuracy_by_tta"]) == {"none", "flip", "flip_translate"}
    served_tta = json.loads((root / "run/config.json").read_text())["tta"]  # tiny's: flip
    assert evaluation["validation"]["accuracy_by_tta"][served_tta] == evaluation["validation"]["after"]["accuracy"]
    assert (root / "run/evaluation/reliability.png").is_file()
    assert "ECE" in (root / "run/evaluation/report.md").read_text()


def test_the_export_serves_the_fitted_temperature(student, small_data_dir):
    """The export's probabilities are the report's: same ECE and NLL on the same test images, and
    unlike the uncalibrated ones the report compares them with."""
    from training.ship.calibration import summary
    from training.recipe.data import load_cifar10
    from training.recipe.contract import predict_exported
    root, _ = student
    evaluation = json.loads((root / "run/evaluation/evaluation.json").read_text())
    assert evaluation["temperature"] != pytest.approx(1.0, abs=1e-3)
    assert evaluation["validation"]["after"]["nll"] < evaluation["validation"]["before"]["nll"]
    _, test = load_cifar10(small_data_dir)
    served = summary(predict_exported(root / "models" / "1", test.images[:256]), test.labels[:256])
    assert served["ece"] == pytest.approx(evaluation["ece"], abs=1e-4)
    assert served["nll"] == pytest.approx(evaluation["nll"], abs=1e-4)
    assert served["nll"] != pytest.approx(evaluation["before_temperature"]["nll"], abs=1e-3)


def test_kill_9_then_resume_ends_where_an_uninterrupted_student_does(small_data_dir, teacher, tmp_path):
    common = [*STUDENT, "--teacher", teacher, "--data", small_data_dir, "--deterministic", "--epochs", 6]
    resumed, straight = killed_resumed_and_straight(tmp_path, 6, *common)
    for a, b in zip(resumed, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_accuracy"] == b["val_accuracy"]


def test_the_distillation_loss_mixes_labels_and_the_teachers_softened_targets():
    import keras
    from training.ship.calibration import softmax
    from training.run.distill import Distiller
    student_logits = np.array([[2.0, 0.5, -1.0] + [0.0] * 7])
    teacher_logits = np.array([[0.0, 3.0, 1.0] + [-1.0] * 7])
    labels = np.eye(10)[[0]]
    alpha, t = 0.3, 4.0
    distiller = Distiller(keras.Sequential([keras.layers.Identity()]), alpha, t)
    y = np.concatenate([labels, teacher_logits], axis=1).astype("float32")
    loss = float(distiller.compute_loss(y=y, y_pred=student_logits.astype("float32")))
    hard = -np.log(softmax(student_logits)[0, 0])
    p, q = softmax(teacher_logits, t)[0], softmax(student_logits, t)[0]
    soft = np.sum(p * np.log(p / q))
    assert loss == pytest.approx(alpha * hard + (1 - alpha) * t ** 2 * soft, rel=1e-4)
    # Labels alone (validation batches): the hard loss.
    assert float(distiller.compute_loss(y=labels.astype("float32"), y_pred=student_logits.astype("float32"))) \
        == pytest.approx(hard, rel=1e-4)


def test_a_trial_reports_the_validation_split_and_never_evaluates_the_test_split(small_data_dir, tmp_path):
    # Two separate processes at once: the refused trial needs nothing of the other.
    refused = start_training("--config", "tiny", *SLICE, "--trial", "--data", small_data_dir,
                             "--run-dir", tmp_path / "bare", log_dir=tmp_path / "bare-logs")
    try:
        result = run_training(*STUDENT, "--trial", "--data", small_data_dir, "--run-dir", tmp_path / "trial")
    finally:
        refused = refused.finish()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation accuracy" in result.stdout and "test accuracy" not in result.stdout
    assert (tmp_path / "trial/metrics.csv").is_file() and not (tmp_path / "trial/evaluation").exists()
    assert refused.returncode == 1 and "needs a validation split" in refused.stderr
