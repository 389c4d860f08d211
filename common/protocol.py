"""The Redis message contract between the gateway and the worker: key names, fields, encoding, TTLs.

Flow: the gateway XADDs one job per image to the JOB_STREAM stream (at most QUEUE_MAXLEN jobs
waiting or in progress), then blocks on the request's result list. Workers read jobs through the
JOB_GROUP consumer group, RPUSH one result per job onto `result_key(request_id)` (a list that
expires after RESULT_TTL_S), and only then XACK + XDEL the job. A job left pending by a dead
worker is reclaimed with XCLAIM by another one, so delivery is at-least-once; a job delivered
MAX_DELIVERIES times without an answer (it killed every worker that took it) goes to the
DEAD_LETTER_STREAM instead and its caller gets JOB_FAILED.
A job whose deadline has passed is dropped unprocessed: its caller has already answered 504.

Each request has two ids. `request_id` names its result list, so it stays the gateway's own
unguessable uuid4. `public_id` is the id the caller sees (X-Request-ID) and every log line names;
it is the same uuid unless the client sent its own id, and only then travels as a field of its own
(F_PUBLIC_ID), so jobs from a gateway that predates it read back with public_id = request_id.

QUEUE_BYTES_KEY counts the image bytes of the jobs in JOB_STREAM: the gateway adds in the same
script that queues them, workers subtract in the same transaction that deletes them. Jobs deleted
any other way (malformed entries, a flushed Redis) make it drift, so the gateway resets it to 0
whenever the stream is empty.
"""
import json
import time
from dataclasses import dataclass

from common.settings import env_str

STREAM = env_str("JOB_STREAM")
GROUP = env_str("JOB_GROUP")
RESULT_KEY_PREFIX = env_str("RESULT_KEY_PREFIX")
QUEUE_BYTES_KEY = env_str("QUEUE_BYTES_KEY", "cifar10:queue-bytes")
DEAD_LETTER_STREAM = env_str("DEAD_LETTER_STREAM", "cifar10:dead-letter")
DEAD_LETTER_MAXLEN = 1000  # the newest poison jobs, kept for inspection (XRANGE) with their images
MAX_DELIVERIES = 3
# Set by workers while the model server reports a loaded version; the gateway's readiness and
# its fast 503 depend on it, so it expires soon after the last worker stops seeing a model.
MODEL_STATUS_KEY = env_str("MODEL_STATUS_KEY", "cifar10:model-status")
MODEL_STATUS_TTL_S = 5
# Set beside it (same TTL): the served version's model card, {"version": N, "card": {...} or null
# for a version exported without one}, which workers fetch once per version; GET /model reads it.
MODEL_CARD_KEY = env_str("MODEL_CARD_KEY", "cifar10:model-card")
# Each worker's connection to the model server, a hash: consumer name -> {"ready": bool, "ms": when}
# (refreshed with MODEL_STATUS_KEY). Deep readiness needs every worker heard from within
# WORKER_CHANNEL_FRESH_MS to be connected: a worker whose channel is still reconnecting would
# make its jobs wait.
WORKER_CHANNELS_KEY = env_str("WORKER_CHANNELS_KEY", "cifar10:worker-channels")
WORKER_CHANNEL_FRESH_MS = 5000
# Long enough for a gateway that waited its full RESULT_TIMEOUT_S; short enough that results of
# abandoned requests do not pile up.
RESULT_TTL_S = 120

# Stream entry fields (bytes, as redis-py returns them).
F_REQUEST_ID = b"rid"
F_INDEX = b"idx"
F_DEADLINE_MS = b"deadline_ms"
F_IMAGE = b"image"
F_PUBLIC_ID = b"pid"  # only when it differs from F_REQUEST_ID

# Error codes a worker can put in a result; the gateway maps each to an HTTP status.
INVALID_IMAGE = "invalid_image"
IMAGE_TOO_LARGE = "image_too_large"
MODEL_UNAVAILABLE = "model_unavailable"
INFERENCE_FAILED = "inference_failed"
JOB_FAILED = "job_failed"  # dead-lettered: processing it killed MAX_DELIVERIES workers


def now_ms() -> int:
    # Wall clock, not monotonic: deadlines cross processes and hosts (keep clocks NTP-synced).
    return int(time.time() * 1000)


def result_key(request_id: str) -> str:
    return RESULT_KEY_PREFIX + request_id


@dataclass(frozen=True)
class Job:
    request_id: str  # names the result list: internal, unguessable
    index: int  # position of the image in its request
    deadline_ms: int
    image: bytes
    public_id: str = ""  # the caller's X-Request-ID, for logs; "" or equal to request_id: the same id

    def __post_init__(self):
        if not self.public_id:  # one spelling of "the same id", so jobs compare equal after a round trip
            object.__setattr__(self, "public_id", self.request_id)

    def fields(self) -> dict[bytes, bytes]:
        fields = {
            F_REQUEST_ID: self.request_id.encode(),
            F_INDEX: str(self.index).encode(),
            F_DEADLINE_MS: str(self.deadline_ms).encode(),
            F_IMAGE: self.image,
        }
        if self.public_id != self.request_id:
            fields[F_PUBLIC_ID] = self.public_id.encode()
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> "Job":
        return cls(
            request_id=fields[F_REQUEST_ID].decode(),
            index=int(fields[F_INDEX]),
            deadline_ms=int(fields[F_DEADLINE_MS]),
            image=fields[F_IMAGE],
            public_id=fields[F_PUBLIC_ID].decode() if F_PUBLIC_ID in fields else "",
        )

    def expired(self, at_ms: int | None = None) -> bool:
        return (now_ms() if at_ms is None else at_ms) >= self.deadline_ms


@dataclass(frozen=True)
class Result:
    index: int
    model_version: int | None = None
    labels: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    ood_score: float | None = None  # None: the version was exported without the out-of-distribution head
    in_distribution: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @classmethod
    def failure(cls, index: int, code: str, message: str) -> "Result":
        return cls(index=index, error_code=code, error_message=message)

    def encode(self) -> bytes:
        if self.ok:
            body = {"i": self.index, "v": self.model_version, "l": self.labels, "p": self.probabilities}
            if self.ood_score is not None:
                body.update(o=self.ood_score, d=self.in_distribution)
        else:
            body = {"i": self.index, "e": self.error_code, "m": self.error_message}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Result":
        body = json.loads(raw)
        if "e" in body:
            return cls.failure(body["i"], body["e"], body["m"])
        return cls(index=body["i"], model_version=body["v"], labels=tuple(body["l"]),
                   probabilities=tuple(body["p"]), ood_score=body.get("o"), in_distribution=body.get("d"))
