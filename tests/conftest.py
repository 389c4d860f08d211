"""One real stack per test session: redis-server, the model server (stand-in or real), two workers
and gunicorn, on free ports, serving a copy of the shipped default model (the highest version under
models/cifar10) as version 1."""
import zipfile

import pytest
import redis

from scripts.stack import LocalStack, Ports, free_port
from tests.helpers import CIFAR_ZIP, CLASSES, SHIPPED_MODEL, TEST_SETTINGS, copy_version


@pytest.fixture(scope="session")
def cifar_zip() -> zipfile.ZipFile:
    assert CIFAR_ZIP.is_file(), f"CIFAR-10 test images expected at {CIFAR_ZIP}"
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        yield archive


@pytest.fixture(scope="session")
def cifar_test_images(cifar_zip) -> list[tuple[str, bytes]]:
    """(label, PNG bytes): the first 8 test images of each class."""
    return [(label, cifar_zip.read(f"test/{label}/{i:04d}.png")) for label in CLASSES for i in range(8)]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    assert (SHIPPED_MODEL / "saved_model.pb").is_file(), f"the shipped model is missing: {SHIPPED_MODEL}"
    run_dir = tmp_path_factory.mktemp("stack")
    base_path = run_dir / "models"
    base_path.mkdir()
    copy_version(SHIPPED_MODEL, base_path, 1)
    ports = Ports(gateway=free_port(), redis=free_port(), grpc=free_port(), worker_metrics=0)
    local = LocalStack(run_dir, ports, base_path, env=TEST_SETTINGS)
    try:
        local.start_redis()
        local.start_model_server()
        for index in range(2):
            local.start_worker(index, metrics_port=free_port())
        local.start_gateway()
        local.wait_ready(timeout_s=240)
        yield local
    finally:
        local.stop_all()


@pytest.fixture(scope="session")
def store(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)
