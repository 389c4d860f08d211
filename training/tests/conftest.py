import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# What small_data_dir holds: more than any slice a test takes from it (at most 1024 training and
# 256 test images), so --train-limit and --test-limit still cut.
SMALL_TRAIN, SMALL_TEST = 2048, 512


@pytest.fixture(scope="session")
def data_dir():
    """The real CIFAR-10 prepared by `make data` (official layout: batches dir and tarball)."""
    path = Path(os.environ.get("CIFAR10_DATA", REPO / "data"))
    if not (path / "cifar-10-batches-py" / "batches.meta").exists():
        pytest.fail(f"no CIFAR-10 in {path}: run `make data` first")
    return path


@pytest.fixture(scope="session")
def small_data_dir(data_dir, tmp_path_factory):
    """The first SMALL_TRAIN training and SMALL_TEST test images of data_dir, pixel for pixel and
    label for label, in the official batch layout (bundle.write_batches, what run.sh unpacks to),
    with its DATASET.txt: the data for runs on a slice, whose first N images are data_dir's first
    N. Decoding all 60,000 images costs each process a second; this costs nothing. Not for what
    must see the whole of CIFAR-10 (an ensemble's report on the 10,000 test images, the bundle)."""
    from training.lab.bundle import write_batches
    from training.recipe.data import BATCH_DIR, load_cifar10
    train, test = load_cifar10(data_dir)
    out = tmp_path_factory.mktemp("small-data")
    write_batches(out / BATCH_DIR, train.images[:SMALL_TRAIN], train.labels[:SMALL_TRAIN],
                  test.images[:SMALL_TEST], test.labels[:SMALL_TEST])
    if (data_dir / "DATASET.txt").is_file():
        (out / "DATASET.txt").write_text((data_dir / "DATASET.txt").read_text())
    return out


TINY_SLICE = ["--train-limit", 1024, "--test-limit", 256]


@pytest.fixture(scope="session")
def tiny_run(small_data_dir, tmp_path_factory):
    """`tiny` for one epoch on the first 1024 training images, evaluated on the first 256 test
    images and exported (tiny's flip TTA) as version 1 of root/models, through the CLI: trained
    once for every module that needs a finished, exported run (test_train, test_distill's teacher,
    test_ensemble's first member, test_views). Tests read root/run and root/models, re-run the
    finished command in place, or copy them before changing anything."""
    root = tmp_path_factory.mktemp("tiny")
    result = run_training("--config", "tiny", "--epochs", 1, "--data", small_data_dir, "--run-dir", root / "run",
                          "--export-base", root / "models", *TINY_SLICE)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def run_training(*args, cwd=REPO):
    """The training CLI as a user runs it, in a fresh process."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "training.train", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


class Started:
    """A training CLI process started in the background (start_training); finish() waits for it
    and returns what run_training returns."""

    def __init__(self, args, log_dir):
        import subprocess
        import sys
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.log", log_dir / "stderr.log"
        self.args = [sys.executable, "-m", "training.train", *map(str, args)]
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(self.args, cwd=REPO, stdout=stdout, stderr=stderr)

    def finish(self, timeout=600):
        import subprocess
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.kill()
        return subprocess.CompletedProcess(self.args, self.process.returncode, self.stdout_path.read_text(),
                                           self.stderr_path.read_text())

    def kill(self):
        stop(self.process)


def stop(process):
    """SIGKILL a test's background process if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
        process.wait()


def start_training(*args, log_dir):
    """The training CLI in a fresh process, in the background, its output in log_dir: an
    uninterrupted reference run trains while the test kills and resumes another (on two cores
    the processes overlap: much of a run is one thread importing, tracing and plotting)."""
    return Started(args, log_dir)


def train_until_killed(run_dir, kill_after_epoch, *args):
    """Start the training CLI with `args`, SIGKILL it once `kill_after_epoch` epochs are
    checkpointed; returns the last checkpointed epoch."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    command = [sys.executable, "-m", "training.train", *map(str, args), "--run-dir", str(run_dir)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(run_dir) / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= kill_after_epoch:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return json.loads(state.read_text())["epoch"]


def killed_resumed_and_straight(root, epochs, *args):
    """The training CLI with `args` for `epochs` epochs twice: in root/resumed, SIGKILLed after 2
    epochs and resumed; in root/straight, uninterrupted, training alongside (start_training). Both
    are checked to finish as such; returns their histories (state.json), resumed then straight."""
    import json
    straight = start_training(*args, "--run-dir", root / "straight", log_dir=root / "straight-logs")
    try:
        killed_at = train_until_killed(root / "resumed", 2, *args)
        assert 2 <= killed_at < epochs, "the run finished before it could be killed"
        resumed = run_training(*args, "--run-dir", root / "resumed")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming {root / 'resumed'} after epoch {killed_at}/{epochs}" in resumed.stdout
    except BaseException:
        straight.kill()
        raise
    straight = straight.finish()
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "resuming" not in straight.stdout and f"epoch {epochs}:" in straight.stdout
    return [json.loads((root / run / "state.json").read_text())["history"] for run in ("resumed", "straight")]


@pytest.fixture(scope="session")
def bundle(data_dir, tmp_path_factory):
    """The GPU bundle (make gpu-bundle) for this Python, built once, its images' parts beside it,
    and the work folder its run.sh installs the wheels and decodes the images into, shared by the
    tests that run it (test_backends, test_gpu_session): (bundle folder, manifest, work folder)."""
    import sys
    pytest.importorskip("jax")
    from training.lab.bundle import build
    root = tmp_path_factory.mktemp("bundle")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = build(root / "gpu-bundle", root / "gpu-data", data_dir, [version])
    return root / "gpu-bundle", manifest, root / "work"
