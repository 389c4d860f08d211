"""The worker's side of the Redis protocol (common/protocol.py): read, reclaim, answer, acknowledge."""
import logging
import time

import redis

from common import protocol
from common.protocol import Job, Result

from worker import metrics

log = logging.getLogger(__name__)

Entry = tuple[bytes, Job]  # stream entry id, job
POLL_INTERVAL_S = 0.0005
# XCLAIM JUSTID keeps the delivery count; only jobs still ours, or it would take back a job that
# another worker has meanwhile claimed.
KEEP_CLAIMED = """
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
"""
# Atomic, so a consumer cannot receive a job between the check and the delete (which would drop
# that job from the pending list, where nobody could reclaim it).
FORGET_IDLE_CONSUMERS = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""


def parse_entries(raw_entries) -> tuple[list[Entry], list[bytes]]:
    """Jobs from stream entries, and the ids of entries that are gone or unreadable (to acknowledge)."""
    jobs, unusable = [], []
    for entry_id, fields in raw_entries:
        try:
            jobs.append((entry_id, Job.from_fields(fields)))
        except (KeyError, ValueError, TypeError, UnicodeDecodeError):
            log.error("dropping malformed job %s", entry_id)
            unusable.append(entry_id)
    return jobs, unusable


class JobStream:
    def __init__(self, client: redis.Redis, consumer: str, max_batch: int, max_wait_ms: int, claim_idle_ms: int):
        self.redis = client
        self.consumer = consumer
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.claim_idle_ms = claim_idle_ms
        self.next_claim_at = 0.0
        self.forget_script = client.register_script(FORGET_IDLE_CONSUMERS)
        self.keep_script = client.register_script(KEEP_CLAIMED)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(protocol.STREAM, protocol.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def next_batch(self, block_ms: int = 1000) -> list[Entry]:
        """Up to max_batch jobs: a dead consumer's stale ones first, else new ones.

        After the first new job arrives, polls for up to max_wait_ms for more to fill the batch: a
        few ms of latency buys fewer, larger Predict calls under load. Polling (non-blocking reads
        and short sleeps here) rather than XREADGROUP BLOCK, because Redis only notices short block
        timeouts on its next cron tick (every 100 ms at the default hz 10).
        """
        reclaimed = self.reclaim_stale()
        if reclaimed:
            return reclaimed
        batch = self.read_new(self.max_batch, block_ms)
        wait_until = time.monotonic() + self.max_wait_ms / 1000
        while batch and len(batch) < self.max_batch and time.monotonic() < wait_until:
            more = self.read_new(self.max_batch - len(batch), None)
            if more:
                batch += more
            else:
                time.sleep(POLL_INTERVAL_S)
        return batch

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        answer = self.redis.xreadgroup(protocol.GROUP, self.consumer, {protocol.STREAM: ">"},
                                       count=count, block=block_ms)
        if not answer:
            return []
        jobs, unusable = parse_entries(answer[0][1])
        self.drop(unusable)
        return jobs

    def reclaim_stale(self) -> list[Entry]:
        """Takes over a job left pending longer than claim_idle_ms: its worker died or hung (a
        live one keeps its claims fresh, see keep_claimed).

        One job at a time, so a batch that took its worker down is retried job by job and a poison
        job goes down alone. XPENDING gives each job's delivery count: a job already delivered
        MAX_DELIVERIES times took down every worker that took it, so it goes to the dead-letter
        stream instead, and its caller gets an answer now rather than a timeout.
        """
        if time.monotonic() < self.next_claim_at:
            return []
        pending = self.redis.xpending_range(protocol.STREAM, protocol.GROUP, "-", "+", 1, idle=self.claim_idle_ms)
        if not pending:
            self.next_claim_at = time.monotonic() + min(1.0, self.claim_idle_ms / 2000)
            self.forget_dead_consumers()
            return []
        [stale] = pending
        claimed = self.redis.xclaim(protocol.STREAM, protocol.GROUP, self.consumer, self.claim_idle_ms,
                                    [stale["message_id"]])
        jobs, unusable = parse_entries(entry for entry in claimed if entry and entry[1])  # deleted: no fields
        self.drop(unusable)
        if jobs and stale["times_delivered"] >= protocol.MAX_DELIVERIES:
            self.dead_letter(jobs)
            return []
        if jobs:
            log.warning("reclaimed a stale job", extra={"request_ids": [jobs[0][1].public_id]})
            metrics.RECLAIMED_JOBS.inc()
        return jobs

    def keep_claimed(self, entry_ids: list[bytes]) -> None:
        """Resets the idle time of jobs this worker still holds, so that a batch slower than
        claim_idle_ms is not taken over while it is being processed."""
        self.keep_script(keys=[protocol.STREAM], args=[protocol.GROUP, self.consumer, *entry_ids])

    def dead_letter(self, poisoned: list[Entry]) -> None:
        """Moves jobs to the dead-letter stream and answers their callers, in one transaction."""
        log.error("dead-lettering %d jobs delivered %d times without an answer: %s", len(poisoned),
                  protocol.MAX_DELIVERIES, ", ".join(f"{job.public_id}/{job.index}" for _, job in poisoned),
                  extra={"request_ids": list(dict.fromkeys(job.public_id for _, job in poisoned))})
        metrics.DEAD_LETTERED_JOBS.inc(len(poisoned))
        with self.redis.pipeline(transaction=True) as pipe:
            for entry_id, job in poisoned:
                pipe.xadd(protocol.DEAD_LETTER_STREAM, {**job.fields(), b"entry_id": entry_id,
                                                        b"consumer": self.consumer.encode()},
                          maxlen=protocol.DEAD_LETTER_MAXLEN, approximate=True)
            self.finish_in(pipe, [(entry_id, job, Result.failure(
                job.index, protocol.JOB_FAILED,
                f"processing this image stopped {protocol.MAX_DELIVERIES} workers; it was set aside and will "
                "not be retried")) for entry_id, job in poisoned])
            pipe.execute()

    def forget_dead_consumers(self) -> None:
        """Removes consumers that hold no job and have had none for a while: killed workers, whose
        names would pile up in the group. Harmless to a live one: its next read adds it back."""
        removed = self.forget_script(keys=[protocol.STREAM], args=[protocol.GROUP, 2 * self.claim_idle_ms])
        if removed:
            log.info("removed %d idle consumers holding no job", removed)

    def finish(self, answered: list[tuple[bytes, Job, Result | None]]) -> None:
        """Writes the results, then acknowledges and deletes the jobs, atomically (MULTI/EXEC).

        A None result is a job dropped without an answer (expired). Deleting acknowledged entries
        keeps XLEN equal to the jobs waiting or in progress, which the gateway's backpressure counts.
        """
        if not answered:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            self.finish_in(pipe, answered)
            pipe.execute()

    @staticmethod
    def finish_in(pipe, answered: list[tuple[bytes, Job, Result | None]]) -> None:
        for _, job, result in answered:
            if result is not None:
                key = protocol.result_key(job.request_id)
                pipe.rpush(key, result.encode())
                pipe.expire(key, protocol.RESULT_TTL_S)
        ids = [entry_id for entry_id, _, _ in answered]
        pipe.xack(protocol.STREAM, protocol.GROUP, *ids)
        pipe.xdel(protocol.STREAM, *ids)
        pipe.decrby(protocol.QUEUE_BYTES_KEY, sum(len(job.image) for _, job, _ in answered))

    def drop(self, entry_ids: list[bytes]) -> None:
        if entry_ids:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(protocol.STREAM, protocol.GROUP, *entry_ids)
                pipe.xdel(protocol.STREAM, *entry_ids)
                pipe.execute()

    def leave_group(self) -> None:
        """On a clean shutdown, remove this consumer, unless it still holds jobs (others will reclaim them)."""
        pending = self.redis.xpending_range(protocol.STREAM, protocol.GROUP, "-", "+", 1, consumername=self.consumer)
        if not pending:
            self.redis.xgroup_delconsumer(protocol.STREAM, protocol.GROUP, self.consumer)
