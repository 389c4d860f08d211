"""One request id per upload, end to end: the gateway answers with it (X-Request-ID), keeps a safe
one the client sent, and the gateway's and a worker's JSON log lines name it."""
import json
import re
import uuid

import requests

from tests.helpers import asset, post_images, wait_until

HEX_ID = re.compile(r"[0-9a-f]{32}")


def log_entries(service) -> list[dict]:
    """The JSON lines of a service's log (other lines, e.g. a C++ library's, are skipped)."""
    entries = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def naming(entries: list[dict], request_id: str) -> list[dict]:
    return [e for e in entries if e.get("request_id") == request_id or request_id in e.get("request_ids", ())]


def lines_naming(stack, request_id: str, prefix: str) -> list[dict]:
    return [e for s in stack.services if s.name.startswith(prefix) for e in naming(log_entries(s), request_id)]


def raw_lines_naming(stack, request_id: str) -> list[str]:
    return [line for s in stack.services if s.name == "gateway" or s.name.startswith("worker")
            for line in s.log_path.read_text(errors="replace").splitlines() if request_id in line]


def assert_followed_through(stack, request_id: str, status: int, images: int) -> list[dict]:
    gateway = lines_naming(stack, request_id, "gateway")
    [line] = [e for e in gateway if e["message"].startswith("POST /predict")]
    assert (line["status"], line["images"], line["level"], line["logger"]) == (status, images, "INFO", "gateway")
    assert line["duration_ms"] > 0 and line["time"].endswith("Z")
    worker = wait_until(lambda: lines_naming(stack, request_id, "worker"), timeout_s=10, what="a worker's log line")
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in worker)
    # Every line that mentions the id is one whole JSON object.
    for raw in raw_lines_naming(stack, request_id):
        assert isinstance(json.loads(raw), dict), raw
    return worker


def test_a_generated_id_is_returned_and_logged_by_gateway_and_worker(stack):
    response = post_images(stack.gateway_url, [asset("frog.jpg")])
    assert response.status_code == 200, response.text
    request_id = response.headers["X-Request-ID"]
    assert HEX_ID.fullmatch(request_id)
    worker = assert_followed_through(stack, request_id, 200, 1)
    assert any(e["message"].startswith("batch of") and e["ok"] >= 1 for e in worker)


def test_a_client_id_is_kept_through_gateway_and_worker(stack):
    request_id = f"e2e-{uuid.uuid4().hex[:12]}_trace"
    response = requests.post(f"{stack.gateway_url}/predict", headers={"X-Request-ID": request_id}, timeout=60,
                             files=[("image", ("frog.jpg", asset("frog.jpg")[1])), ("image", ("a.txt", b"text"))])
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == request_id
    worker = assert_followed_through(stack, request_id, 200, 2)
    [failure] = [e for e in worker if e["level"] == "WARNING"]
    assert (failure["outcome"], failure["index"]) == ("invalid_image", 1)


def test_errors_carry_the_id_too(stack):
    response = post_images(stack.gateway_url, [("notes.txt", b"this is not an image")])
    assert response.status_code == 422
    assert_followed_through(stack, response.headers["X-Request-ID"], 422, 1)

    refused = requests.post(f"{stack.gateway_url}/predict", timeout=30, headers={"X-Request-ID": "not safe!"})
    assert refused.status_code == 400
    request_id = refused.headers["X-Request-ID"]
    assert HEX_ID.fullmatch(request_id)  # an unsafe client id is replaced
    [line] = lines_naming(stack, request_id, "gateway")
    assert (line["status"], line["images"], line["error"]) == (400, 0, "missing_image")
