"""X-Request-ID on every /predict answer and one JSON-ready log line per request, on the Flask test
client (the error paths need no Redis; the end-to-end path is tests/test_request_ids.py)."""
import io
import logging
import re

import pytest

from gateway import tracing
from gateway.app import create_app
from scripts.stack import free_port

HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    return create_app().test_client()


def predict_lines(caplog):
    return [r for r in caplog.records if r.name == "gateway" and r.getMessage().startswith("POST /predict")]


@pytest.mark.parametrize("header, kept", [
    ("client-trace_0042", True), ("a" * 64, True), ("A", True),
    ("a" * 65, False), ("has space", False), ("semi;colon", False), ("ünïcode", False), ("", False),
])
def test_a_safe_client_id_is_kept_and_anything_else_replaced(header, kept):
    public, internal = tracing.request_ids(header)
    assert HEX_ID.fullmatch(internal)  # the result key is always the gateway's own
    assert public == (header if kept else internal)


def test_ids_are_fresh_each_request():
    assert len({tracing.request_ids(None)[1] for _ in range(100)}) == 100


def test_an_error_before_the_upload_is_read_carries_an_id_and_is_logged(client, caplog):
    caplog.set_level(logging.INFO, "gateway")
    response = client.post("/predict?top_k=zero", headers={"X-Request-ID": "trace-1"})
    assert response.status_code == 400
    assert response.headers["X-Request-ID"] == "trace-1"
    [line] = predict_lines(caplog)
    assert (line.request_id, line.status, line.images, line.error) == ("trace-1", 400, 0, "invalid_top_k")
    assert line.duration_ms >= 0 and line.levelname == "INFO"


def test_a_wrong_method_and_an_unsafe_header_get_a_generated_id(client):
    response = client.get("/predict", headers={"X-Request-ID": "bad id"})
    assert response.status_code == 405
    assert HEX_ID.fullmatch(response.headers["X-Request-ID"])


def test_redis_down_is_a_warning_with_the_images_counted_and_every_line_names_the_id(client, caplog):
    caplog.set_level(logging.INFO, "gateway")
    response = client.post("/predict", data={"image": (io.BytesIO(b"\xff\xd8 not really"), "a.jpg")})
    assert response.status_code == 503
    request_id = response.headers["X-Request-ID"]
    assert HEX_ID.fullmatch(request_id)
    [line] = predict_lines(caplog)
    assert (line.status, line.images, line.error, line.levelname) == (503, 1, "queue_unavailable", "WARNING")
    gateway_lines = [r for r in caplog.records if r.name == "gateway"]
    assert len(gateway_lines) == 2  # "redis error: ..." then the request's line
    assert all(r.request_id == request_id for r in gateway_lines)


def test_other_endpoints_carry_no_id(client):
    assert "X-Request-ID" not in client.get("/healthz").headers
