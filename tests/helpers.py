"""Helpers for the end-to-end tests: free ports, polling, uploads, test settings."""
import os
import shutil
import signal
import time
from pathlib import Path

import requests

from scripts.stack import LocalStack
from tfserving.versions import list_versions

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_BASE = REPO / "models" / "cifar10"
# The served default: the highest shipped version (version 1 is the teacher it was distilled from).
SHIPPED_MODEL = Path(os.environ.get("TEST_MODEL_DIR", SHIPPED_BASE / str(max(list_versions(SHIPPED_BASE)))))
CIFAR_ZIP = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-png.zip"  # the official pixels
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Short enough to keep the tests quick, long enough for a batch on a busy 2-core machine.
TEST_SETTINGS = {"CLAIM_IDLE_MS": "2000", "GRPC_TIMEOUT_S": "3", "RESULT_TIMEOUT_S": "20",
                 "MAX_UPLOAD_BYTES": str(2 * 1024 * 1024), "MAX_IMAGES_PER_REQUEST": "8", "WEB_CONCURRENCY": "1",
                 "GUNICORN_THREADS": "16"}


def wait_until(condition, timeout_s: float = 60, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def copy_version(source: Path, base_path: Path, version: int) -> Path:
    """Adds a version the way an exporter must: complete under a non-integer name, then renamed."""
    staging = base_path / f".staging-{version}"
    shutil.copytree(source, staging)
    final = base_path / str(version)
    staging.rename(final)
    return final


def post_images(url: str, images: list[tuple[str, bytes]], field: str = "image", params=None,
                timeout: float = 60) -> requests.Response:
    files = [(field, (name, data, "application/octet-stream")) for name, data in images]
    return requests.post(f"{url}/predict", files=files, params=params, timeout=timeout)


def asset(name: str) -> tuple[str, bytes]:
    return name, (ASSETS / name).read_bytes()


def restart(stack: LocalStack, name: str):
    """Replaces a stopped or killed service of the session stack with a fresh one of the same kind."""
    old = next(s for s in stack.services if s.name == name)
    if old.alive():
        old.stop(signal.SIGTERM)
    stack.services.remove(old)
    if name == "model-server":
        return stack.start_model_server()
    if name == "redis":
        return stack.start_redis()
    if name == "gateway":
        return stack.start_gateway()
    return stack.start_worker(int(name.split("-")[1]), metrics_port=old.metrics_port)
