"""End to end through real processes: gunicorn -> redis-server -> workers -> model server (gRPC)."""
import json
import os
import shutil
import signal
import struct
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from common import protocol
from scripts.stack import LocalStack, Ports, free_port
from tests.helpers import (ASSETS, CLASSES, SHIPPED_MODEL, asset, copy_version, post_images, restart,
                            wait_until)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels: a decompression bomb as far as the header goes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body


def assert_full_ranking(body: dict) -> None:
    predictions = body["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def service(stack: LocalStack, name: str):
    return next(s for s in stack.services if s.name == name)


def test_seed_curl_call(stack):
    # The original service's README example, verbatim apart from the port.
    result = subprocess.run(["curl", "-s", "-X", "POST", "-F", "image=@frog.jpg", f"{stack.gateway_url}/predict"],
                            cwd=ASSETS, capture_output=True, text=True, timeout=60, check=True)
    body = json.loads(result.stdout)
    assert body["success"] is True
    assert body["model_version"] == 1
    assert_full_ranking(body)


@pytest.mark.parametrize("name", ["photo-800x530-upscaled-cifar-frog.jpg", "cifar-ship-32x32.png"])
def test_photo_and_png(stack, name):
    response = post_images(stack.gateway_url, [asset(name)])
    assert response.status_code == 200, response.text
    assert_full_ranking(response.json())


def test_top_k_returns_the_most_probable(stack):
    full = post_images(stack.gateway_url, [asset("frog.jpg")]).json()["predictions"]
    top3 = post_images(stack.gateway_url, [asset("frog.jpg")], params={"top_k": 3}).json()["predictions"]
    assert top3 == full[:3]


def test_several_images_answer_in_order(stack, cifar_test_images):
    images = [(f"{label}.jpg", data) for label, data in cifar_test_images[::9][:6]]
    body = post_images(stack.gateway_url, images).json()
    assert body["success"] is True
    singles = [post_images(stack.gateway_url, [image]).json()["predictions"] for image in images]
    # Batched and single inference may differ in the last float bits, so in the 6th rounded decimal.
    for result, single in zip(body["results"], singles, strict=True):
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in single]
        assert [p["probability"] for p in result["predictions"]] == pytest.approx(
            [p["probability"] for p in single], abs=2e-6)


def test_real_model_recognises_cifar_test_images(stack, cifar_test_images):
    """The whole path (upload, Pillow preprocessing, gRPC, SavedModel) agrees with the training data."""
    correct = 0
    for start in range(0, len(cifar_test_images), 8):
        chunk = cifar_test_images[start:start + 8]
        body = post_images(stack.gateway_url, [(f"{label}.jpg", data) for label, data in chunk]).json()
        correct += sum(result["predictions"][0]["label"] == label
                       for (label, _), result in zip(chunk, body["results"]))
    assert correct / len(cifar_test_images) >= 0.6, f"{correct}/{len(cifar_test_images)} right"


def test_missing_or_misnamed_file_field(stack):
    assert_error(requests.post(f"{stack.gateway_url}/predict", timeout=30), 400, "missing_image")
    body = assert_error(post_images(stack.gateway_url, [asset("frog.jpg")], field="file"), 400, "missing_image")
    assert "'file'" in body["error"]["message"]


def test_malformed_or_non_multipart_bodies(stack):
    cut = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\nabc'
    response = requests.post(f"{stack.gateway_url}/predict", data=cut, timeout=30,
                             headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert_error(response, 400, "malformed_multipart")
    assert_error(requests.post(f"{stack.gateway_url}/predict", json={"image": "frog.jpg"}, timeout=30),
                 400, "missing_image")


def test_bad_images_fail_alone(stack):
    assert_error(post_images(stack.gateway_url, [("notes.txt", b"this is not an image")]), 422, "invalid_image")
    name, jpeg = asset("photo-800x530-upscaled-cifar-frog.jpg")
    assert_error(post_images(stack.gateway_url, [("cut.jpg", jpeg[:400])]), 422, "invalid_image")
    assert_error(post_images(stack.gateway_url, [("bomb.png", png_header_only(8000, 8000))]), 422, "image_too_large")
    assert_error(post_images(stack.gateway_url, [("empty.jpg", b"")]), 400, "empty_image")
    mixed = post_images(stack.gateway_url, [asset("frog.jpg"), ("notes.txt", b"nope"), asset("cifar-ship-32x32.png")])
    assert mixed.status_code == 200
    body = mixed.json()
    assert body["success"] is False
    assert [r["success"] for r in body["results"]] == [True, False, True]
    assert body["results"][1]["error"]["code"] == "invalid_image"


def test_request_limits(stack):
    too_big = ("big.jpg", os.urandom(3 * 1024 * 1024))  # the test stack caps uploads at 2 MiB
    assert_error(post_images(stack.gateway_url, [too_big]), 413, "payload_too_large")
    assert_error(post_images(stack.gateway_url, [asset("frog.jpg")] * 9), 400, "too_many_images")
    for bad in ("0", "11", "abc"):
        assert_error(post_images(stack.gateway_url, [asset("frog.jpg")], params={"top_k": bad}), 400, "invalid_top_k")


def test_unknown_routes_answer_json(stack):
    assert_error(requests.get(f"{stack.gateway_url}/nope", timeout=10), 404, "not_found")
    assert_error(requests.get(f"{stack.gateway_url}/predict", timeout=10), 405, "method_not_allowed")


def test_health_readiness_and_metrics(stack):
    assert requests.get(f"{stack.gateway_url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{stack.gateway_url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True, "model_version": 1}
    post_images(stack.gateway_url, [asset("frog.jpg")])
    post_images(stack.gateway_url, [("notes.txt", b"not an image")])
    metrics = requests.get(f"{stack.gateway_url}/metrics", timeout=10).text
    assert 'gateway_requests_total{endpoint="/predict",status="200"}' in metrics
    assert "gateway_predict_seconds_bucket" in metrics
    assert "gateway_queue_depth 0.0" in metrics
    worker_metrics = "".join(requests.get(url, timeout=10).text for url in stack.worker_metrics_urls())
    for name in ("worker_batch_size_count", "worker_preprocess_seconds_count", "worker_inference_seconds_count",
                 'worker_jobs_total{outcome="ok"}', 'worker_jobs_total{outcome="invalid_image"}'):
        assert name in worker_metrics


@pytest.fixture
def extra_gateway(stack, tmp_path):
    """Starts another gateway on the session's Redis with its own settings; stopped after the test."""
    started = []

    def start(**settings) -> str:
        local = LocalStack(tmp_path, Ports(free_port(), stack.ports.redis, 0, 0), stack.model_base_path,
                           env={k: str(v) for k, v in settings.items()})
        local.start_gateway()
        started.append(local)
        wait_for_http(f"{local.gateway_url}/healthz")
        return local.gateway_url

    yield start
    for local in started:
        local.stop_all()


def wait_for_http(url: str) -> None:
    def answers():
        try:
            return requests.get(url, timeout=2).ok
        except requests.ConnectionError:
            return False
    wait_until(answers, what=url)


def test_queue_full_is_503_with_retry_after(extra_gateway):
    url = extra_gateway(QUEUE_MAXLEN=2)
    response = post_images(url, [asset("frog.jpg")] * 3)
    assert_error(response, 503, "queue_full")
    assert response.headers["Retry-After"] == "1"


def test_result_timeout_is_504(stack, extra_gateway):
    # A Redis database no worker reads: the job waits until the gateway gives up and then expires.
    idle_db = redis.Redis(port=stack.ports.redis, db=1)
    idle_db.set(protocol.MODEL_STATUS_KEY, '{"version": 1}')
    url = extra_gateway(REDIS_URL=f"redis://127.0.0.1:{stack.ports.redis}/1", RESULT_TIMEOUT_S=1)
    assert_error(post_images(url, [asset("frog.jpg")]), 504, "timeout")
    idle_db.flushdb()


def test_redis_down_is_503_and_the_gateway_stays_up(extra_gateway):
    url = extra_gateway(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    response = post_images(url, [asset("frog.jpg")])
    assert_error(response, 503, "queue_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 503
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_new_version_is_served_without_restart(stack):
    def served_version():
        return post_images(stack.gateway_url, [asset("frog.jpg")]).json().get("model_version")

    copy_version(SHIPPED_MODEL, stack.model_base_path, 2)
    wait_until(lambda: served_version() == 2, what="version 2 to be served")
    wait_until(lambda: requests.get(f"{stack.gateway_url}/readyz", timeout=10).json().get("model_version") == 2,
               what="readiness to report version 2")
    # Like TF Serving, removing the newest version falls back to the one before.
    shutil.rmtree(stack.model_base_path / "2")
    wait_until(lambda: served_version() == 1, what="fallback to version 1")


def save_model_without_probabilities(path):
    """A version that breaks the export contract: its signature answers `scores`, not `probabilities`."""
    import tensorflow as tf

    class Scores(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="images")])
        def serve(self, images):
            batch = tf.shape(images)[0]
            return {"scores": tf.fill([batch, 10], 0.1),
                    "classes": tf.tile(tf.constant(CLASSES)[tf.newaxis], [batch, 1])}
    module = Scores()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def test_a_version_that_breaks_the_contract_fails_its_requests_not_the_workers(stack, tmp_path):
    save_model_without_probabilities(tmp_path / "scores")
    copy_version(tmp_path / "scores", stack.model_base_path, 2)
    try:
        # Readiness may still name an earlier version 2 for a second: wait for this one to answer.
        wait_until(lambda: post_images(stack.gateway_url, [asset("frog.jpg")]).status_code == 502,
                   what="the broken version to be served")
        with ThreadPoolExecutor(4) as pool:  # batches of several jobs, each retried alone
            responses = list(pool.map(lambda _: post_images(stack.gateway_url, [asset("frog.jpg")] * 3), range(4)))
        for response in responses:
            body = assert_error(response, 502, "inference_failed")
            assert "could not be read" in body["error"]["message"]
        assert service(stack, "worker-0").alive() and service(stack, "worker-1").alive()
    finally:
        shutil.rmtree(stack.model_base_path / "2")
    wait_until(lambda: post_images(stack.gateway_url, [asset("frog.jpg")]).status_code == 200,
               what="version 1 to serve again")


def test_worker_killed_mid_batch_loses_no_request(stack, store):
    model_server = service(stack, "model-server")
    workers = [service(stack, "worker-0"), service(stack, "worker-1")]
    os.killpg(model_server.process.pid, signal.SIGSTOP)  # whoever takes the job hangs in Predict
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post_images, stack.gateway_url, [asset("frog.jpg")])
            holder = wait_until(lambda: next((c["name"].decode() for c in
                                              store.xpending(protocol.STREAM, protocol.GROUP)["consumers"]), None),
                                what="a worker to take the job")
            victim = service(stack, "worker-" + holder.split("-")[1])
            victim.stop(signal.SIGKILL)
            os.killpg(model_server.process.pid, signal.SIGCONT)
            response = pending.result(timeout=60)
    finally:
        os.killpg(model_server.process.pid, signal.SIGCONT)
    assert response.status_code == 200, response.text
    assert_full_ranking(response.json())
    survivor = next(w for w in workers if w is not victim)
    reclaimed = requests.get(f"http://127.0.0.1:{survivor.metrics_port}/metrics", timeout=10).text
    assert "worker_jobs_reclaimed_total 1.0" in reclaimed
    restart(stack, victim.name)


def test_model_server_down_gives_503_then_recovers(stack):
    service(stack, "model-server").stop(signal.SIGTERM)
    responses = []
    wait_until(lambda: responses.append(post_images(stack.gateway_url, [asset("frog.jpg")]))
               or responses[-1].status_code == 503, what="503 while the model server is down")
    response = responses[-1]
    assert {r.status_code for r in responses} <= {200, 503}  # in-flight requests may still succeed
    assert_error(response, 503, "model_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert requests.get(f"{stack.gateway_url}/readyz", timeout=10).status_code == 503
    restart(stack, "model-server")
    wait_until(stack.ready, timeout_s=240, what="readiness after the model server came back")
    response = post_images(stack.gateway_url, [asset("frog.jpg")])
    assert response.status_code == 200, response.text
