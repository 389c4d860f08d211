"""One training loop on two Keras backends, and the portable GPU run: a bundle (make gpu-bundle)
is built, its run.sh trains `tiny` under JAX from the bundle's own code, wheels and data (in its
own processes, as the backend is chosen before keras is imported), is killed with SIGKILL after
2 of 4 epochs (Lookahead starts in the 4th) and resumed, and ends where an uninterrupted JAX run
does; `make export` turns it into a version with TensorFlow, which serves what the JAX model
computes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from training.tests.conftest import REPO, stop

RUN = ["--epochs", "4", "--train-limit", "1024", "--test-limit", "256"]
# Under JAX: an uninterrupted run (this checkout's code), trained while the bundle is built and its
# run killed and resumed; then, from the bundle's run directory once the file `go` says that run has
# finished, the network's flip-averaged logits (tiny's TTA) for the first 256 test images.
JAX_SIDE = """
import sys
import time
from pathlib import Path
import numpy as np
from training.recipe.data import load_cifar10
from training.run.rundir import network_from_run, saved_config
from training.train import main
data, straight, run, out, go = sys.argv[1:6]
main(["--config", "tiny", "--data", data, "--run-dir", straight, *sys.argv[6:]])
deadline = time.monotonic() + 600
while not Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit(f"{go} never appeared: the bundle's run did not finish")
    time.sleep(0.1)
train, test = load_cifar10(data)
model, meta = network_from_run(saved_config(run), run, train.images[:1024])
x = test.images[:256].astype("float32")
logits = (np.asarray(model.predict(x, verbose=0)) + np.asarray(model.predict(x[:, :, ::-1], verbose=0))) / 2
np.save(out, logits)
"""


@pytest.fixture(scope="module", autouse=True)
def jax_reference(request, data_dir, tmp_path_factory):
    """JAX_SIDE, started with the module when jax_run is wanted: its uninterrupted run needs no
    bundle, so it trains while the bundle is built and its run killed and resumed (a process of
    its own, its own run directory); it waits for the file `go` before reading the bundle's run."""
    if not any("jax_run" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield None
        return
    pytest.importorskip("jax")
    root = tmp_path_factory.mktemp("jax")
    go, log = root / "bundle-run-finished", root / "side.log"
    with open(log, "w") as out:
        side = subprocess.Popen([sys.executable, "-c", JAX_SIDE, data_dir, root / "straight", root / "run",
                                 root / "logits.npy", go, *RUN], env={**os.environ, "KERAS_BACKEND": "jax"},
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    yield root, side, go, log
    stop(side)


def run_until_killed(command, env, state, epoch):
    """Start `command`; SIGKILL it once `state` records `epoch` epochs; returns that state's epoch."""
    import signal
    import time
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= epoch:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # run.sh exec's python: this is the trainer
    process.wait()
    return json.loads(state.read_text())["epoch"]


@pytest.fixture(scope="module")
def jax_run(bundle, jax_reference):
    out, _, work = bundle
    root, side, go, side_log = jax_reference
    try:
        env = {**os.environ, "PYTHON": sys.executable, "BUNDLE_WORK": str(work)}
        command = [str(out / "run.sh"), "tiny", str(root / "run"), *RUN]
        killed_at = run_until_killed(command, env, root / "run/state.json", 2)
        assert 2 <= killed_at < 4, "the run finished before it could be killed"
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert f"after epoch {killed_at}/4" in result.stdout
        go.touch()
        side.wait(timeout=600)
    finally:
        stop(side)
    assert side.returncode == 0, side_log.read_text()[-3000:]
    return root, result


def test_the_bundle_and_its_parts_travel_in_calls_within_the_carry_limit(bundle):
    from training.lab.bundle import CARRY_LIMIT
    out, manifest, _ = bundle
    assert (out / "code/training/train.py").is_file() and (out / "run.sh").is_file()
    assert {w.split("-")[0].lower() for w in manifest["wheels"]} == {"keras", "optree", "namex"}
    assert manifest["images"] == {"train": 50000, "test": 10000} and manifest["format"] == "PNG"
    parts = manifest["parts"]
    assert [p["bytes"] for p in parts] == [(out.parent / "gpu-data" / p["name"]).stat().st_size for p in parts]
    # The official pixels do not fit in one call: each call carries its parts beside the working tree.
    assert len(manifest["calls"]) > 1 and manifest["calls"][-1]["bundle"]
    assert sum(call["parts"] for call in manifest["calls"]) == len(parts)
    sizes = iter(p["bytes"] for p in parts)
    for call in manifest["calls"]:
        carried = sum(next(sizes) for _ in range(call["parts"])) + (manifest["bundle_bytes"] if call["bundle"] else 0)
        assert manifest["tree_bytes"] + carried <= CARRY_LIMIT


def test_run_sh_names_the_parts_that_have_not_arrived(bundle, tmp_path):
    out, manifest, _ = bundle
    data = tmp_path / "gpu-data"
    shutil.copytree(out.parent / "gpu-data", data)
    (data / manifest["parts"][1]["name"]).unlink()
    with open(data / manifest["parts"][0]["name"], "r+b") as damaged:
        damaged.truncate(1000)
    env = {**os.environ, "PYTHON": sys.executable, "BUNDLE_WORK": str(tmp_path / "work"), "BUNDLE_DATA": str(data)}
    result = subprocess.run([str(out / "run.sh"), "unpack"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not (tmp_path / "work" / "cifar10").exists()
    assert f"{manifest['parts'][1]['name']} is missing" in result.stderr
    assert f"{manifest['parts'][0]['name']} is damaged (1000 of" in result.stderr


def test_the_bundle_trains_under_jax_on_pixels_identical_to_the_data_and_resumes_exactly(jax_run, bundle):
    root, result = jax_run
    work = bundle[2]
    assert (work / "cifar10/DIGEST").is_file()  # decoded and checked on the first start
    assert "training tiny under jax" in result.stdout and "epoch 4:" in result.stdout
    assert "make export RUN=" in result.stdout
    assert "jit_compile" not in result.stderr  # no fallback: the whole step compiles under JAX too
    assert (work / "site/keras").is_dir()  # the bundle's keras, not this environment's
    state = json.loads((root / "run/state.json").read_text())
    assert state["backend"] == "jax" and state["epoch"] == 4
    straight = json.loads((root / "straight/state.json").read_text())["history"]
    for a, b in zip(state["history"], straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_accuracy"] == b["val_accuracy"]
    assert (root / "run/weights.float16.npz").is_file() and (root / "run/history.png").is_file()
    assert not (root / "run/evaluation").exists()


def test_make_export_turns_the_jax_run_into_a_version_that_serves_what_jax_computes(jax_run, data_dir):
    from training.ship.calibration import softmax
    from training.recipe.data import load_cifar10
    from training.recipe.contract import predict_exported
    root, _ = jax_run
    made = subprocess.run(["make", "-o", "setup", "export", f"RUN={root / 'run'}", f"DATA_DIR={data_dir}",
                           f"MODEL_BASE_PATH={root / 'models'}", f"PY={sys.executable}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    assert "trained under jax" in made.stdout and "jit_compile" not in made.stderr
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


def test_export_refuses_a_run_that_has_not_finished(jax_run, tmp_path, data_dir):
    import shutil
    from training.ship.finish import main
    root, _ = jax_run
    shutil.copytree(root / "run", tmp_path / "run")
    config = json.loads((tmp_path / "run/config.json").read_text())
    (tmp_path / "run/config.json").write_text(json.dumps({**config, "epochs": 6}))
    with pytest.raises(SystemExit, match="not finished \\(4 of 6 epochs\\)"):
        main([str(tmp_path / "run"), "--data", str(data_dir)])
