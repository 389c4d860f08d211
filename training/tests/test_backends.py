"""One training loop on two Keras backends: a run trained under JAX (in its own process, as the
backend is chosen before keras is imported) is exported by TensorFlow and serves what the JAX
model computes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training.tests.conftest import REPO

SLICE = ["--train-limit", "1024", "--test-limit", "256"]
# Train `tiny` (flip TTA) under JAX, then compute, still under JAX, the network's flip-averaged
# logits for the first test images from the run's weights file.
JAX_SIDE = """
import sys
import numpy as np
from training.train import main
data, run, out = sys.argv[1:4]
main(["--config", "tiny", "--data", data, "--run-dir", run, *sys.argv[4:]])
from training.data import load_cifar10
from training.finish import network_from_run, saved_config
train, test = load_cifar10(data)
model, meta = network_from_run(saved_config(run), run, train.images[:1024])
x = test.images[:256].astype("float32")
logits = (np.asarray(model.predict(x, verbose=0)) + np.asarray(model.predict(x[:, :, ::-1], verbose=0))) / 2
np.save(out, logits)
"""


def run_under(backend, *args):
    env = {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def jax_run(data_dir, tmp_path_factory):
    pytest.importorskip("jax")
    root = tmp_path_factory.mktemp("jax")
    result = run_under("jax", "-c", JAX_SIDE, data_dir, root / "run", root / "logits.npy", *SLICE)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_jax_trains_the_same_configuration_compiled_and_leaves_the_export_to_tensorflow(jax_run):
    root, result = jax_run
    assert "training tiny under jax" in result.stdout and "epoch 1:" in result.stdout
    assert "make export RUN=" in result.stdout
    assert "jit_compile" not in result.stderr  # no fallback: the whole step compiles under JAX too
    state = json.loads((root / "run/state.json").read_text())
    assert state["backend"] == "jax" and state["epoch"] == 1
    assert (root / "run/weights.float16.npz").is_file() and (root / "run/history.png").is_file()
    assert not (root / "run/evaluation").exists()


def test_a_jax_run_exported_by_tensorflow_serves_what_the_jax_model_computes(jax_run, data_dir):
    from training.calibration import softmax
    from training.data import load_cifar10
    from training.export import predict_exported
    from training.finish import main
    root, _ = jax_run
    main([str(root / "run"), "--data", str(data_dir), "--export-base", str(root / "models")])
    evaluation = json.loads((root / "run/evaluation/evaluation.json").read_text())
    assert evaluation["images"] == 256
    assert json.loads((root / "run/export.json").read_text())["flip"]["version"] == 1
    _, test = load_cifar10(data_dir)
    served = predict_exported(root / "models" / "1", test.images[:256])
    computed = softmax(np.load(root / "logits.npy"))
    # Same float16-rounded kernels on both sides: only float32 arithmetic order differs.
    assert np.abs(served - computed).max() < 1e-4
    assert (served.argmax(1) == computed.argmax(1)).all()
    assert (served.argmax(1) == test.labels[:256]).mean() == pytest.approx(evaluation["accuracy"])


def test_export_refuses_a_run_that_has_not_finished(jax_run, tmp_path, data_dir, capsys):
    import shutil
    from training.finish import main
    root, _ = jax_run
    shutil.copytree(root / "run", tmp_path / "run")
    config = json.loads((tmp_path / "run/config.json").read_text())
    (tmp_path / "run/config.json").write_text(json.dumps({**config, "epochs": 3}))
    with pytest.raises(SystemExit, match="not finished \\(1 of 3 epochs\\)"):
        main([str(tmp_path / "run"), "--data", str(data_dir)])
