"""GET /model end to end: the card the export wrote into the SavedModel (training/ship/card.py) reaches
the gateway, which has no model files, through the model server (a Predict on the version's
`model_card` signature), a worker and Redis."""
import json

import pytest
import redis
import requests

from common import protocol
from gateway.app import create_app
from gateway.settings import Settings
from scripts.stack import free_port
from tests.helpers import CLASSES, SHIPPED_MODEL, wait_until

CARD_FILE = "assets.extra/model_card.json"


def served_version(stack) -> int:
    return requests.get(f"{stack.gateway_url}/readyz?deep=1", timeout=10).json()["model_version"]


def test_the_served_versions_card_reaches_the_gateway(stack):
    def card():
        response = requests.get(f"{stack.gateway_url}/model", timeout=10)
        return response if response.status_code == 200 else None

    response = wait_until(card, timeout_s=30, what="GET /model to answer 200")
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    written = json.loads((SHIPPED_MODEL / CARD_FILE).read_text())
    # The copy of the shipped model is served under its own number, which the card does not fix.
    assert body == {"version": served_version(stack), **written}
    assert body["classes"] == CLASSES
    assert body["training"]["data"] == "CIFAR-10" and body["training"]["config"] and body["training"]["date"]
    assert 0.5 < body["evaluation"]["accuracy"] <= 1 and 0 <= body["evaluation"]["ece"] < 1
    assert body["cost_per_image"]["multiply_adds"] > 0 and body["cost_per_image"]["parameters"] > 0
    assert requests.post(f"{stack.gateway_url}/model", timeout=10).status_code == 405


@pytest.fixture
def gateway_on(stack, monkeypatch):
    """A gateway app (Flask test client) on a Redis database no worker writes, and that database."""
    database = redis.Redis(port=stack.ports.redis, db=2)
    database.flushdb()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{stack.ports.redis}/2")
    yield create_app(Settings.from_env()).test_client(), database
    database.flushdb()


def test_get_model_says_what_is_not_known(gateway_on):
    client, database = gateway_on

    def error(status: int, code: str) -> str:
        response = client.get("/model")
        assert response.status_code == status, response.text
        assert response.content_type == "application/json"
        body = response.get_json()
        assert body["success"] is False and body["error"]["code"] == code
        if status == 503:
            assert response.headers["Retry-After"] == "1"
        return body["error"]["message"]

    assert "no model" in error(503, "model_unavailable")  # no worker sees a model
    database.set(protocol.MODEL_STATUS_KEY, json.dumps({"version": None, "rejected": {"4": ["no output"]}}))
    assert "no model" in error(503, "model_unavailable")  # none meets the contract
    database.set(protocol.MODEL_STATUS_KEY, json.dumps({"version": 3, "rejected": {}}))
    assert "version 3 is not known yet" in error(503, "model_unavailable")  # not fetched yet
    database.set(protocol.MODEL_CARD_KEY, json.dumps({"version": 2, "card": {"classes": CLASSES}}))
    assert "version 3 is not known yet" in error(503, "model_unavailable")  # the previous version's
    database.set(protocol.MODEL_CARD_KEY, json.dumps({"version": 3, "card": None}))
    assert error(404, "no_model_card") == "model version 3 was exported without a model card"
    database.set(protocol.MODEL_CARD_KEY, json.dumps({"version": 3, "card": {"classes": CLASSES}}))
    assert client.get("/model").get_json() == {"version": 3, "classes": CLASSES}


def test_get_model_with_redis_down_is_503(monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    response = create_app(Settings.from_env()).test_client().get("/model")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "queue_unavailable"
