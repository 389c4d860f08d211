"""The gateway's side of the Redis protocol (common/protocol.py): enqueue with backpressure, await results."""
import time
import uuid

import redis

from common import protocol
from common.protocol import Job, Result

# One round trip that checks a model is being served and the queue has room, then adds every image
# of the request, so a request is either queued whole or refused whole.
ENQUEUE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local jobs, per_job = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('XLEN', KEYS[1]) + jobs > tonumber(ARGV[1]) then return -2 end
for i = 0, jobs - 1 do
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4 + i * per_job, 3 + (i + 1) * per_job))
end
return jobs
"""


class QueueFull(Exception):
    pass


class ModelUnavailable(Exception):
    pass


class ResultTimeout(Exception):
    pass


class JobQueue:
    def __init__(self, client: redis.Redis, maxlen: int, timeout_s: float):
        self.redis = client
        self.maxlen = maxlen
        self.timeout_s = timeout_s
        self.enqueue_script = client.register_script(ENQUEUE_SCRIPT)

    def submit(self, images: list[bytes]) -> str:
        """Queues one job per image; returns the request id whose result list to wait on."""
        request_id = uuid.uuid4().hex
        deadline_ms = protocol.now_ms() + int(self.timeout_s * 1000)
        args = []
        for index, image in enumerate(images):
            for field, value in Job(request_id, index, deadline_ms, image).fields().items():
                args += [field, value]
        answer = self.enqueue_script(keys=[protocol.STREAM, protocol.MODEL_STATUS_KEY],
                                     args=[self.maxlen, len(images), len(args) // len(images), *args])
        if answer == -1:
            raise ModelUnavailable()
        if answer == -2:
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

    def depth(self) -> int:
        return self.redis.xlen(protocol.STREAM)

    def model_status(self) -> bytes | None:
        return self.redis.get(protocol.MODEL_STATUS_KEY)
