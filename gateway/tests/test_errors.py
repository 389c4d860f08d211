"""gateway.errors, the ingress's JSON error backend, run for real as `python -m gateway.errors` on
a free port: the status comes from ingress-nginx's X-Code header, every answer is the gateway's
JSON error body, and it stops at once on SIGTERM (it runs as PID 1 in its pod)."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import errors

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(**env):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.errors"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env={"PATH": os.environ.get("PATH", ""), "ERRORS_BIND": f"127.0.0.1:{port}", **env})
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"gateway.errors did not start: {proc.communicate()[0]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def backend():
    proc, port = start()
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def request(port, method="GET", path="/predict", headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_x_code_503_gets_a_json_503(backend):
    response, body = request(backend, headers={"X-Code": "503", "X-Original-URI": "/predict"})
    assert response.status == 503
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body) == {"success": False, "error": {
        "code": "service_unavailable", "message": errors.CODES[503][1]}}
    assert response.getheader("Retry-After") == "1"


def test_without_x_code_the_answer_is_a_json_404(backend):
    response, body = request(backend, path="/anything/else")
    assert response.status == 404
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body) == {"success": False, "error": {
        "code": "not_found", "message": errors.CODES[404][1]}}


@pytest.mark.parametrize("x_code,code", [("502", "bad_gateway"), ("504", "timeout"),
                                         ("429", "rate_limited"), ("413", "payload_too_large")])
def test_proxy_errors_use_the_gateway_vocabulary(backend, x_code, code):
    response, body = request(backend, method="POST", headers={"X-Code": x_code}, body=b"x" * 100)
    assert response.status == int(x_code)
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body)["error"]["code"] == code
    assert json.loads(body)["success"] is False


@pytest.mark.parametrize("x_code", ["", "abc", "200", "302", "999"])
def test_unusable_x_code_falls_back_to_the_default(backend, x_code):
    response, body = request(backend, headers={"X-Code": x_code})
    assert response.status == 404
    assert json.loads(body)["error"]["code"] == "not_found"


def test_unlisted_status_gets_a_code_from_its_reason_phrase(backend):
    response, body = request(backend, headers={"X-Code": "507"})
    assert response.status == 507
    assert json.loads(body)["error"]["code"] == "insufficient_storage"


def test_an_upload_is_read_before_the_answer_and_the_connection_reused(backend):
    """While the gateway has no pod, ingress-nginx hands this backend the client's whole upload."""
    conn = http.client.HTTPConnection("127.0.0.1", backend, timeout=10)
    try:
        for _ in range(2):
            conn.request("POST", "/predict", body=b"\0" * (2 * 1024 * 1024),
                         headers={"Content-Type": "multipart/form-data; boundary=x"})
            response = conn.getresponse()
            assert response.status == 404
            assert json.loads(response.read())["success"] is False
    finally:
        conn.close()


def test_head_gets_headers_only(backend):
    response, body = request(backend, method="HEAD", headers={"X-Code": "503"})
    assert response.status == 503 and body == b""


def test_default_status_is_configurable_and_sigterm_stops_it():
    """The Kubernetes manifests set ERRORS_DEFAULT_STATUS=503: without X-Code this backend only
    sees /predict requests that ingress-nginx routes to it because no gateway pod is ready."""
    proc, port = start(ERRORS_DEFAULT_STATUS="503", RETRY_AFTER_S="3")
    try:
        response, body = request(port, method="POST", body=b"image")
        assert response.status == 503
        assert response.getheader("Retry-After") == "3"
        assert json.loads(body)["error"]["code"] == "service_unavailable"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
