import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def data_dir():
    """The real CIFAR-10 prepared by `make data` (official layout: batches dir and tarball)."""
    path = Path(os.environ.get("CIFAR10_DATA", REPO / "data"))
    if not (path / "cifar-10-batches-py" / "batches.meta").exists():
        pytest.fail(f"no CIFAR-10 in {path}: run `make data` first")
    return path


def run_training(*args, cwd=REPO):
    """The training CLI as a user runs it, in a fresh process."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "training.train", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


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
