"""The serving contract a model version must meet before a worker sends it images.

Checked from GetModelMetadata's `serving_default` signature, once per version: a version that
answers with other names, types or shapes would fail every request (or worse, answer nonsense),
so it is not served. The export writes this contract (training/ship/export.py: serving_function).
"""
import json
import logging
import threading

import grpc

from worker import metrics
from worker.tfserving_client import (CARD_SIGNATURE, DT_BOOL, DT_FLOAT, DT_STRING, DT_UINT8, IN_DISTRIBUTION,
                                     OOD_SCORE, TFServingClient)

log = logging.getLogger(__name__)

NUM_CLASSES = 10
# name -> (dtype, shape; -1 is a free batch dimension)
INPUTS = {"images": (DT_UINT8, [-1, 32, 32, 3])}
OUTPUTS = {"probabilities": (DT_FLOAT, [-1, NUM_CLASSES]), "classes": (DT_STRING, [-1, NUM_CLASSES])}
# Versions exported with the out-of-distribution head answer both of these; older ones neither.
OOD_OUTPUTS = {OOD_SCORE: (DT_FLOAT, [-1]), IN_DISTRIBUTION: (DT_BOOL, [-1])}
DTYPE_NAMES = {DT_UINT8: "uint8", DT_FLOAT: "float32", DT_STRING: "string", DT_BOOL: "bool"}


def describe(dtype: int, shape: list[int] | None) -> str:
    return f"{DTYPE_NAMES.get(dtype, f'dtype {dtype}')} {shape if shape is not None else '[unknown rank]'}"


def violations(signature) -> list[str]:
    """What a SignatureDef gets wrong against the contract; empty if it meets it."""
    problems = []
    outputs = dict(OUTPUTS)
    if set(OOD_OUTPUTS) & set(signature.outputs):  # one without the other is a broken export
        outputs.update(OOD_OUTPUTS)
    for kind, expected, actual in (("input", INPUTS, signature.inputs), ("output", outputs, signature.outputs)):
        for name, (dtype, shape) in expected.items():
            if name not in actual:
                problems.append(f"no {kind} '{name}' (has {', '.join(sorted(actual)) or 'none'})")
                continue
            info = actual[name]
            found = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
            if info.dtype != dtype or found != shape:
                problems.append(f"{kind} '{name}' is {describe(info.dtype, found)}, expected {describe(dtype, shape)}")
    extra = sorted(set(signature.inputs) - set(INPUTS))
    if extra:
        problems.append(f"extra inputs the worker does not send: {', '.join(extra)}")
    return problems


class NoServableVersion(Exception):
    pass


class ModelVersions:
    """Which loaded versions meet the contract; Predict goes to the highest that does, by number,
    so no request ever reaches a version that was not checked."""

    def __init__(self, client: TFServingClient):
        self.client = client
        self.verdicts: dict[int, list[str]] = {}  # version -> violations (empty: good)
        self.has_card: dict[int, bool] = {}  # version -> whether it has a `model_card` signature
        self.cards: dict[int, dict | None] = {}  # version -> its model card (None: it has none)
        self.lock = threading.Lock()
        self.available: list[int] = []
        self.served: int | None = None

    def refresh(self) -> int | None:
        """Asks the model server what is loaded (GetModelStatus) and chooses the version to serve."""
        self.available = self.client.available_versions()
        self.served = self.choose(self.available)
        return self.served

    def predict(self, images, deadline: float | None = None):
        """Predict on the served version (until `deadline`: TFServingClient.predict). If that
        version has just been unloaded (a rollout), chooses again and retries once."""
        version = self.served if self.served is not None else self.refresh()
        for attempt in range(2):
            if version is None:
                rejected = "; ".join(f"version {v}: {', '.join(p)}" for v, p in self.rejected(self.available).items())
                raise NoServableVersion(f"no loaded model version meets the serving contract ({rejected})"
                                        if rejected else "no model version is loaded")
            try:
                return self.client.predict(images, version, deadline)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or attempt:
                    raise
            version = self.refresh()

    def problems(self, version: int) -> list[str]:
        """The version's violations, checked once (GetModelMetadata) and remembered."""
        with self.lock:
            known = self.verdicts.get(version)
        if known is not None:
            return known
        signatures = self.client.signatures(version)
        signature = signatures.get("serving_default")
        found = violations(signature) if signature is not None else ["no 'serving_default' signature"]
        with self.lock:
            self.verdicts[version] = found
            self.has_card[version] = CARD_SIGNATURE in signatures
        if found:
            log.error("model version %d breaks the serving contract, not serving it: %s", version, "; ".join(found))
        return found

    def choose(self, available: list[int]) -> int | None:
        """The highest available version that meets the contract (None if none does)."""
        with self.lock:  # an unloaded version may come back with other files: check it again then
            self.verdicts = {v: p for v, p in self.verdicts.items() if v in available}
            self.has_card = {v: c for v, c in self.has_card.items() if v in available}
            self.cards = {v: c for v, c in self.cards.items() if v in available}
        good = None
        for version in available:
            try:
                if not self.problems(version):
                    good = version
            except grpc.RpcError as exc:  # unloaded meanwhile, or the server went away: decide next time
                metrics.GRPC_ERRORS.labels(exc.code().name).inc()
        metrics.SERVED_VERSION.set(good or 0)
        metrics.REJECTED_VERSIONS.set(len(self.rejected(available)))
        return good

    def card(self, version: int) -> tuple[bool, dict | None]:
        """(known, card) of a version that passed the contract: its `model_card` signature's
        answer, fetched once (Predict) and remembered; (True, None) for a version exported without
        one, (False, None) while it cannot be fetched (asked again on the next call)."""
        with self.lock:
            if version in self.cards:
                return True, self.cards[version]
            has_card = self.has_card.get(version)
        if has_card is None:  # not checked against the contract yet
            return False, None
        card = None
        if has_card:
            try:
                card = json.loads(self.client.model_card(version))
                if not isinstance(card, dict):
                    raise ValueError(f"a JSON {type(card).__name__}, not an object")
            except grpc.RpcError as exc:  # unloaded meanwhile, or the server went away: next time
                metrics.GRPC_ERRORS.labels(exc.code().name).inc()
                return False, None
            except ValueError as exc:
                log.error("model version %d has an unreadable model card (%s); serving it without one", version, exc)
                card = None
        with self.lock:
            self.cards[version] = card
        return True, card

    def rejected(self, available: list[int]) -> dict[int, list[str]]:
        with self.lock:
            return {v: self.verdicts[v] for v in available if self.verdicts.get(v)}
