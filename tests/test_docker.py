"""`docker compose up` for real: the images built here (compose/images.sh, with the local stand-ins
where the official images cannot be pulled), the stack started under a compose project of its own,
and used only through its published port on 127.0.0.1: predictions, errors, the model card,
readiness, a killed worker brought back by the restart policy, and the trainer's new version
served without a restart. The project's containers, network and volumes are removed at the end.

Needs a running Docker daemon (.ci/run starts one); DOCKER_TESTS=0 skips this module on purpose.
"""
import json
import os
import secrets
import signal
import subprocess
import time

import pytest
import requests

from scripts.stack import free_port
from tests.helpers import ASSETS, CLASSES, REPO, asset, post_images, wait_until

COMPOSE = REPO / "compose" / "compose.sh"

if os.environ.get("DOCKER_TESTS") == "0":
    pytest.skip("DOCKER_TESTS=0", allow_module_level=True)


def run(*command, timeout=1200, **kwargs):
    result = subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


class Project:
    """One compose project on a free gateway port."""

    def __init__(self):
        self.name = f"cifar10test{secrets.token_hex(3)}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "GATEWAY_HOST_PORT": str(self.port), "GATEWAY_HOST_IP": "127.0.0.1"}

    def compose(self, *args, timeout=600):
        return run(COMPOSE, "-p", self.name, *args, timeout=timeout, env=self.env)

    def container(self, service):
        return self.compose("ps", "-q", service).stdout.split()[0]

    def ready(self):
        try:
            response = requests.get(f"{self.url}/readyz", params={"deep": 1}, timeout=5)
        except requests.RequestException:
            return None
        return response.json() if response.status_code == 200 else None


@pytest.fixture(scope="module")
def project():
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker daemon answers: start one (.ci/run does), or set DOCKER_TESTS=0 to skip")
    built = run(REPO / "compose" / "images.sh", timeout=1800)
    print(built.stdout)
    project = Project()
    try:
        started = time.monotonic()
        project.compose("up", "--detach")
        project.readiness = wait_until(project.ready, timeout_s=300, interval_s=1, what="the stack's /readyz?deep=1")
        project.seconds_to_ready = time.monotonic() - started
        yield project
    finally:
        subprocess.run([str(COMPOSE), "-p", project.name, "--profile", "train", "down", "-v", "--remove-orphans"],
                       cwd=REPO, env=project.env, capture_output=True, timeout=300)


def test_the_stack_answers_the_seeds_call_through_the_published_port(project):
    response = post_images(project.url, [asset("frog.jpg")])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["model_version"] == project.readiness["model_version"]
    assert sorted(p["label"] for p in body["predictions"]) == sorted(CLASSES)
    assert body["predictions"][0]["label"] == "frog"
    assert "ood_score" in body


def test_a_bad_upload_gets_a_json_error(project):
    response = post_images(project.url, [("notes.txt", b"not an image at all")])
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_image"
    response = requests.post(f"{project.url}/predict", files={"picture": ("frog.jpg", b"x")}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_image"


def test_the_model_card_and_deep_readiness(project):
    card = requests.get(f"{project.url}/model", timeout=10)
    assert card.status_code == 200, card.text
    assert card.json()["version"] == project.readiness["model_version"] and card.json()["classes"] == CLASSES
    assert project.readiness["ready"] is True and project.readiness["rejected_versions"] == {}


def test_a_killed_worker_is_brought_back_and_requests_are_answered(project):
    worker = project.container("worker")
    pid = int(run("docker", "inspect", "-f", "{{.State.Pid}}", worker).stdout)
    os.kill(pid, signal.SIGKILL)  # as a crash: the daemon, not a user, sees it stop

    def restarted():
        state = json.loads(run("docker", "inspect", worker).stdout)[0]
        return state["RestartCount"] >= 1 and state["State"]["Health"]["Status"] == "healthy"
    wait_until(restarted, timeout_s=120, interval_s=1, what="the worker's restart")
    frog = (ASSETS / "frog.jpg").read_bytes()
    answers = [post_images(project.url, [("frog.jpg", frog)], timeout=30) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5


def test_the_trainer_exports_a_version_the_running_stack_serves(project):
    before = project.readiness["model_version"]
    project.compose("--profile", "train", "run", "--rm", "-v", f"{REPO / 'data'}:/cifar10:ro", "trainer",
                    "--config", "tiny", "--epochs", "1", "--train-limit", "1024", "--test-limit", "256",
                    "--data", "/cifar10", "--run-dir", "/runs/tiny", "--export-base", "/models/cifar10", timeout=900)

    def serving_the_new_version():
        ready = project.ready()
        return ready if ready and ready["model_version"] > before else None
    ready = wait_until(serving_the_new_version, timeout_s=120, interval_s=1, what="the trainer's version served")
    body = post_images(project.url, [asset("frog.jpg")]).json()
    assert body["success"] is True and body["model_version"] == ready["model_version"]


@pytest.mark.parametrize("image,limit_mb", [("cifar10/worker:1.0.0", 300), ("cifar10/gateway:1.0.0", 200)])
def test_the_serving_images_carry_no_tensorflow(project, image, limit_mb):
    for module in ("tensorflow", "tensorflow_serving"):
        imported = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python", image,
                                   "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
        assert imported.returncode != 0 and f"No module named '{module}'" in imported.stderr, imported.stderr
    size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert size <= limit_mb * 10**6, f"{image}: {size / 1e6:.0f} MB"
