"""The ensemble CLI as users run it, on two tiny runs trained on different slices of CIFAR-10
(1024 and 512 images), ensembled on the whole of it."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from training.recipe.contract import predict_exported
from training.ship.export import existing_versions
from training.tests.conftest import REPO, run_training, stop


def start_ensemble(*args, log):
    """The ensemble CLI in a fresh process, in the background, its output (both streams) in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "training.ship.ensemble", *map(str, args)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def two_runs(tiny_run, small_data_dir, tmp_path_factory):
    """The session's tiny run (conftest: the first 1024 training images) and one on the first 512."""
    root = tmp_path_factory.mktemp("ensemble")
    result = run_training("--config", "tiny", "--data", small_data_dir, "--run-dir", root / "b",
                          "--train-limit", 512, "--test-limit", 64)
    assert result.returncode == 0, result.stderr[-3000:]
    return tiny_run[0] / "run", root / "b", root


def test_the_exported_ensemble_serves_the_softmax_of_its_members_mean_logits(two_runs, data_dir):
    import tensorflow as tf
    from training.recipe.data import channel_stats, load_cifar10
    from training.ship.ensemble import load_member
    from training.recipe.models import averaged_logits
    a, b, root = two_runs
    log = root / "ensemble.log"
    cli = start_ensemble(a, b, "--data", data_dir, "--out", root / "out", "--export-base", root / "models", log=log)
    try:  # meanwhile (a process each, on two cores), the members rebuilt here, as the CLI builds them
        train, test = load_cifar10(data_dir)
        images = test.images[:64]
        pixels = tf.constant(images, tf.float32)
        loaded = [load_member(run, train.images, i)[0] for i, run in enumerate((a, b))]
        members = [averaged_logits(model, pixels, "flip").numpy() for model in loaded]
        cli.wait(timeout=600)
    finally:
        stop(cli)
    assert cli.returncode == 0, log.read_text()[-3000:]
    for model, trained_on in zip(loaded, (1024, 512)):  # each with the statistics of its own images
        mean, std = channel_stats(train.images[:trained_on])
        normalization = model.get_layer("normalization")
        assert np.allclose(np.ravel(normalization.mean), mean, rtol=1e-5)
        assert np.allclose(np.sqrt(np.ravel(normalization.variance)), std, rtol=1e-5)
    assert existing_versions(root / "models") == [1]
    record = json.loads((root / "out/members.json").read_text())
    evaluation = json.loads((root / "out/evaluation/evaluation.json").read_text())
    assert record["tta"] == "flip" and record["accuracy"] == evaluation["accuracy"]
    assert [m["run"] for m in record["members"]] == [str(a), str(b)]
    assert record["members"][0]["config"]["name"] == "tiny"
    assert evaluation["images"] == 10000 and np.sum(evaluation["confusion_matrix"]) == 10000

    from training.ship.card import read_card
    card = read_card(root / "models/1")  # what GET /model answers for this version
    assert card["training"]["config"] == "ensemble" and card["evaluation"]["accuracy"] == round(evaluation["accuracy"], 4)
    assert [m["config"] for m in card["training"]["members"]] == ["tiny", "tiny"] and card["cost_per_image"]["multiply_adds"] > 0

    served = predict_exported(root / "models/1", images)
    assert np.allclose(served, tf.nn.softmax((members[0] + members[1]) / 2).numpy(), atol=1e-3)
    for logits in members:  # and not simply one of them
        assert np.abs(served - tf.nn.softmax(logits).numpy()).max() > 1e-3


def test_an_unfinished_run_or_a_missing_one_is_refused_by_name(two_runs, small_data_dir, tmp_path):
    """The CLI's main in this process (no TensorFlow start-up per refusal), as test_backends runs
    training.ship.finish's for an unfinished run: a refusal is sys.exit with the message, which the user
    sees on stderr with exit status 1 and no traceback; any other exception fails pytest.raises."""
    from training.ship.ensemble import main
    a, b, _ = two_runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(a, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "epochs": 3}))
    with pytest.raises(SystemExit) as refused:
        main([str(b), str(unfinished), "--data", str(small_data_dir), "--out", str(tmp_path / "out")])
    assert isinstance(refused.value.code, str) and f"{unfinished} is not finished (1 of 3 epochs)" in refused.value.code
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "nowhere"), str(b), "--data", str(small_data_dir), "--out", str(tmp_path / "out")])
    assert isinstance(refused.value.code, str) and "nowhere is not a run directory" in refused.value.code
    assert not (tmp_path / "out").exists()
