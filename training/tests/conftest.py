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
