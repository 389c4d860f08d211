"""The gateway's side of the Redis protocol (common/protocol.py): enqueue with backpressure, await results."""
import json
import time
import uuid

import redis

from common import protocol
from common.protocol import Job, Result

# One round trip that checks a model is being served and the queue has room (in jobs and in image
# bytes), then adds every image of the request, so a request is either queued whole or refused whole.
ENQUEUE_SCRIPT = """
local status = redis.call('GET', KEYS[2])
if not status or cjson.decode(status)['version'] == cjson.null then return -1 end
local max_jobs, max_bytes, jobs, bytes, per_job = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local depth = redis.call('XLEN', KEYS[1])
local queued_bytes = tonumber(redis.call('GET', KEYS[3]) or '0')
if depth == 0 or queued_bytes < 0 then queued_bytes = 0 end
if depth + jobs > max_jobs then return -2 end
if queued_bytes + bytes > max_bytes then return -3 end
for i = 0, jobs - 1 do
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6 + i * per_job, 5 + (i + 1) * per_job))
end
redis.call('SET', KEYS[3], queued_bytes + bytes)
return jobs
"""


class QueueFull(Exception):
    """The queue holds too many jobs, or too many image bytes, for this request."""


class ModelUnavailable(Exception):
    pass


class ResultTimeout(Exception):
    pass


class JobQueue:
    def __init__(self, client: redis.Redis, maxlen: int, max_bytes: int, timeout_s: float):
        self.redis = client
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.enqueue_script = client.register_script(ENQUEUE_SCRIPT)

    def submit(self, images: list[bytes], request_id: str | None = None, public_id: str = "") -> str:
        """Queues one job per image; returns the request id whose result list to wait on (a fresh
        uuid4 unless given: never a client's id). public_id: the id logs name, if not that one."""
        request_id = request_id or uuid.uuid4().hex
        deadline_ms = protocol.now_ms() + int(self.timeout_s * 1000)
        args = []
        for index, image in enumerate(images):
            for field, value in Job(request_id, index, deadline_ms, image, public_id).fields().items():
                args += [field, value]
        try:
            answer = self.enqueue_script(
                keys=[protocol.STREAM, protocol.MODEL_STATUS_KEY, protocol.QUEUE_BYTES_KEY],
                args=[self.maxlen, self.max_bytes, len(images), sum(map(len, images)), len(args) // len(images), *args])
        except redis.exceptions.OutOfMemoryError:  # Redis at maxmemory (noeviction): refused, nothing evicted
            raise QueueFull() from None
        if answer == -1:
            raise ModelUnavailable()
        if answer in (-2, -3):
            raise QueueFull()
        return request_id

    def results(self, request_id: str, count: int) -> list[Result]:
        """The request's results in image order; ResultTimeout if they are not all in by the deadline."""
        key = protocol.result_key(request_id)
        deadline = time.monotonic() + self.timeout_s
        by_index: dict[int, Result] = {}
        while len(by_index) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout()
            # Redis reads a timeout that rounds to 0 ms as "block forever".
            popped = self.redis.blpop([key], timeout=max(remaining, 0.01))
            if popped:
                result = Result.decode(popped[1])
                by_index[result.index] = result  # a job redelivered after a worker died may answer twice
        return [by_index[i] for i in range(count)]

    def occupancy(self) -> tuple[int, int]:
        """(jobs, image bytes) waiting or in progress, in one round trip; bytes count 0 when the
        stream is empty, as the enqueue script resets them."""
        with self.redis.pipeline(transaction=False) as pipe:
            depth, queued_bytes = pipe.xlen(protocol.STREAM).get(protocol.QUEUE_BYTES_KEY).execute()
        return depth, int(queued_bytes or 0) if depth else 0

    def model_status(self) -> dict | None:
        """What the workers last saw on the model server (see worker.main.model_status)."""
        raw = self.redis.get(protocol.MODEL_STATUS_KEY)
        return json.loads(raw) if raw else None

    def unconnected_workers(self) -> list[str]:
        """Workers heard from lately whose channel to the model server is not connected."""
        fresh = protocol.now_ms() - protocol.WORKER_CHANNEL_FRESH_MS
        channels = {name.decode(): json.loads(raw) for name, raw in self.redis.hgetall(protocol.WORKER_CHANNELS_KEY).items()}
        return sorted(name for name, channel in channels.items() if channel["ms"] >= fresh and not channel["ready"])
