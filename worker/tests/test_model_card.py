"""The worker fetches each version's model card once, after its contract check, and publishes the
served version's card (worker.main.served_card) for GET /model."""
import json

import grpc
import pytest

from worker.contract import ModelVersions
from worker.main import served_card
from worker.serving_apis import apis
from worker.tfserving_client import DT_FLOAT, DT_STRING, DT_UINT8

CARD = {"classes": ["airplane"], "training": {"config": "student"}}


def signature_map(with_card: bool) -> dict:
    signatures = apis.SignatureDefMap()
    serving = signatures.signature_def["serving_default"]
    for tensors, name, dtype, shape in ((serving.inputs, "images", DT_UINT8, [-1, 32, 32, 3]),
                                        (serving.outputs, "probabilities", DT_FLOAT, [-1, 10]),
                                        (serving.outputs, "classes", DT_STRING, [-1, 10])):
        tensors[name].dtype = dtype
        for size in shape:
            tensors[name].tensor_shape.dim.add(size=size)
    if with_card:
        signatures.signature_def["model_card"].outputs["card"].dtype = DT_STRING
    return dict(signatures.signature_def)


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


class FakeServer:
    """GetModelStatus, GetModelMetadata and the model_card Predict, counted."""

    def __init__(self, cards: dict):
        self.cards = cards  # version -> card text; a version absent here has no model_card signature
        self.loaded = sorted(cards)
        self.card_calls = 0
        self.fail_next_card = False

    def available_versions(self):
        return self.loaded

    def signatures(self, version):
        return signature_map(version in self.cards and self.cards[version] is not None)

    def model_card(self, version):
        self.card_calls += 1
        if self.fail_next_card:
            self.fail_next_card = False
            raise Unavailable()
        return self.cards[version]


def test_the_card_is_fetched_once_per_version_and_a_failed_fetch_is_retried():
    server = FakeServer({1: json.dumps(CARD)})
    versions = ModelVersions(server)
    assert versions.card(1) == (False, None)  # not checked against the contract yet: not asked
    assert versions.refresh() == 1 and server.card_calls == 0
    server.fail_next_card = True
    assert versions.card(1) == (False, None) and server.card_calls == 1
    assert versions.card(1) == (True, CARD) and server.card_calls == 2
    assert versions.card(1) == (True, CARD) and server.card_calls == 2
    assert json.loads(served_card(versions, 1)) == {"version": 1, "card": CARD}
    assert served_card(versions, None) is None


@pytest.mark.parametrize("text", [None, "not json", "[1, 2]"])
def test_a_version_without_a_readable_card_is_served_with_none(text):
    server = FakeServer({2: text})
    versions = ModelVersions(server)
    assert versions.refresh() == 2
    assert versions.card(2) == (True, None)
    assert server.card_calls == (0 if text is None else 1)
    assert json.loads(served_card(versions, 2)) == {"version": 2, "card": None}


def test_a_version_loaded_again_has_its_card_fetched_again():
    server = FakeServer({1: json.dumps(CARD), 2: json.dumps({"classes": []})})
    versions = ModelVersions(server)
    assert versions.refresh() == 2 and versions.card(2) == (True, {"classes": []})
    server.loaded = [1]
    assert versions.refresh() == 1 and versions.card(1) == (True, CARD)
    server.cards[2] = json.dumps({"classes": ["new"]})  # other files under the same number
    server.loaded = [1, 2]
    assert versions.refresh() == 2 and versions.card(2) == (True, {"classes": ["new"]})
