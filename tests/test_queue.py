"""The Redis protocol between gateway.jobs and worker.jobs, on a real redis-server: byte-bounded
backpressure, reclaiming with delivery counts, the dead-letter stream, a flushed Redis, dead consumers."""
import json
import subprocess
import time

import pytest
import redis

from common import protocol
from gateway.jobs import JobQueue, ModelUnavailable, QueueFull
from scripts.stack import free_port
from tests.helpers import wait_until
from worker.jobs import JobStream

CLAIM_IDLE_MS = 200


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                              stdout=subprocess.DEVNULL)
    wait_until(lambda: _pings(port), timeout_s=20, what="redis-server")
    yield port
    server.terminate()
    server.wait()


def _pings(port: int) -> bool:
    try:
        return redis.Redis(port=port).ping()
    except redis.ConnectionError:
        return False


@pytest.fixture
def store(redis_port):
    client = redis.Redis(port=redis_port)
    client.flushall()
    client.set(protocol.MODEL_STATUS_KEY, json.dumps({"version": 1, "rejected": {}}))
    return client


def queue(store, max_jobs=100, max_bytes=10_000) -> JobQueue:
    return JobQueue(store, max_jobs, max_bytes, timeout_s=30)


def stream(store, consumer: str) -> JobStream:
    group = JobStream(store, consumer, max_batch=8, max_wait_ms=0, claim_idle_ms=CLAIM_IDLE_MS)
    group.ensure_group()
    return group


def results(store, request_id: str) -> list[protocol.Result]:
    return [protocol.Result.decode(raw) for raw in store.lrange(protocol.result_key(request_id), 0, -1)]


def test_the_queue_is_bounded_in_bytes_and_the_count_follows_the_jobs(store):
    jobs = queue(store, max_bytes=1000)
    worker = stream(store, "w1")
    jobs.submit([b"x" * 400, b"y" * 400])
    assert jobs.occupancy()[1] == 800
    with pytest.raises(QueueFull):
        jobs.submit([b"z" * 300])  # 1100 > 1000: refused whole, nothing added
    assert store.xlen(protocol.STREAM) == 2 and jobs.occupancy()[1] == 800
    batch = worker.next_batch(block_ms=100)
    worker.finish([(entry_id, job, protocol.Result.failure(job.index, "x", "y")) for entry_id, job in batch[:1]])
    assert jobs.occupancy()[1] == 400  # the worker subtracts in the transaction that deletes the job
    jobs.submit([b"z" * 300])
    assert jobs.occupancy()[1] == 700


def test_a_drifted_byte_count_resets_when_the_queue_empties(store):
    store.set(protocol.QUEUE_BYTES_KEY, 10**9)  # e.g. jobs deleted by hand
    jobs = queue(store, max_bytes=1000)
    jobs.submit([b"x" * 10])
    assert jobs.occupancy()[1] == 10


def test_no_servable_version_refuses_before_queueing(store):
    store.set(protocol.MODEL_STATUS_KEY, json.dumps({"version": None, "rejected": {"2": ["no output"]}}))
    with pytest.raises(ModelUnavailable):
        queue(store).submit([b"x"])
    store.delete(protocol.MODEL_STATUS_KEY)
    with pytest.raises(ModelUnavailable):
        queue(store).submit([b"x"])
    assert store.xlen(protocol.STREAM) == 0


def test_redis_at_maxmemory_is_queue_full_and_evicts_nothing(store):
    jobs = queue(store, max_bytes=10**9)
    request_id = jobs.submit([b"k" * 100])
    used = store.info("memory")["used_memory"]
    store.config_set("maxmemory-policy", "noeviction")
    store.config_set("maxmemory", used + 64 * 1024)
    try:
        with pytest.raises(QueueFull):
            for _ in range(20):
                jobs.submit([b"x" * 16 * 1024] * 4)
    finally:
        store.config_set("maxmemory", 0)
    first = store.xrange(protocol.STREAM, count=1)[0][1]
    assert first[protocol.F_REQUEST_ID].decode() == request_id


def test_a_job_that_keeps_killing_workers_is_dead_lettered_and_answered(store):
    jobs = queue(store)
    request_id = jobs.submit([b"poison" * 10])
    holder = stream(store, "w0").next_batch(block_ms=100)  # delivery 1; then "w0" dies
    assert len(holder) == 1
    for consumer in ("w1", "w2"):  # each takes it over and dies with it too: deliveries 2 and 3
        time.sleep(CLAIM_IDLE_MS * 2 / 1000)
        assert len(stream(store, consumer).next_batch(block_ms=100)) == 1
    time.sleep(CLAIM_IDLE_MS * 2 / 1000)
    assert stream(store, "w3").next_batch(block_ms=100) == []  # not handed out a fourth time
    [answer] = results(store, request_id)
    assert answer.error_code == protocol.JOB_FAILED and "set aside" in answer.error_message
    [(_, letter)] = store.xrange(protocol.DEAD_LETTER_STREAM)
    assert letter[protocol.F_REQUEST_ID].decode() == request_id and letter[protocol.F_IMAGE] == b"poison" * 10
    assert store.xlen(protocol.STREAM) == 0 and store.xpending(protocol.STREAM, protocol.GROUP)["pending"] == 0
    assert jobs.occupancy()[1] == 0


def test_a_batch_that_killed_its_worker_is_retried_job_by_job_so_only_the_poison_job_fails(store):
    jobs = queue(store)
    request_id = jobs.submit([b"fine-1", b"poison", b"fine-2"])
    assert len(stream(store, "w0").next_batch(block_ms=100)) == 3  # then "w0" dies with all three
    answered = {}
    for consumer in ("w1", "w2", "w3", "w4", "w5", "w6"):
        time.sleep(CLAIM_IDLE_MS * 1.5 / 1000)
        worker = stream(store, consumer)
        for entry_id, job in worker.next_batch(block_ms=10):  # at most one reclaimed job
            if job.image == b"poison":
                break  # the worker dies again
            worker.finish([(entry_id, job, protocol.Result.failure(job.index, "ok", "processed"))])
            answered[job.image] = consumer
    assert set(answered) == {b"fine-1", b"fine-2"}
    dead = [r for r in results(store, request_id) if r.error_code == protocol.JOB_FAILED]
    assert [r.index for r in dead] == [1] and store.xlen(protocol.DEAD_LETTER_STREAM) == 1


def test_a_job_reclaimed_once_is_processed_not_dead_lettered(store):
    jobs = queue(store)
    jobs.submit([b"fine"])
    stream(store, "w0").next_batch(block_ms=100)
    time.sleep(CLAIM_IDLE_MS * 2 / 1000)
    [(_, job)] = stream(store, "w1").next_batch(block_ms=100)
    assert job.image == b"fine" and store.xlen(protocol.DEAD_LETTER_STREAM) == 0


def test_a_batch_slower_than_the_claim_time_stays_with_its_live_worker(store):
    jobs = queue(store)
    jobs.submit([b"slow", b"batch"])
    slow = stream(store, "slow")
    held = [entry_id for entry_id, _ in slow.next_batch(block_ms=100)]
    for _ in range(6):  # 3 claim times in all, refreshed every half of one
        time.sleep(CLAIM_IDLE_MS / 2000)
        slow.keep_claimed(held)
        assert stream(store, "other").next_batch(block_ms=10) == []
    time.sleep(CLAIM_IDLE_MS * 1.5 / 1000)  # now it stops refreshing, as a dead worker would
    [(_, job)] = stream(store, "other").next_batch(block_ms=10)  # one at a time
    assert job.image == b"slow"
    assert store.xpending_range(protocol.STREAM, protocol.GROUP, "-", "+", 10)[0]["times_delivered"] == 2


def test_refreshing_never_takes_back_a_job_another_worker_claimed(store):
    queue(store).submit([b"taken"])
    first = stream(store, "first")
    [(entry_id, _)] = first.next_batch(block_ms=100)
    time.sleep(CLAIM_IDLE_MS * 1.5 / 1000)
    assert len(stream(store, "second").next_batch(block_ms=10)) == 1
    first.keep_claimed([entry_id])  # too late: "second" owns it now
    [owner] = store.xpending_range(protocol.STREAM, protocol.GROUP, "-", "+", 10)
    assert owner["consumer"] == b"second"


def test_workers_recreate_the_group_after_a_flush(store):
    worker = stream(store, "w1")
    store.flushall()
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        worker.next_batch(block_ms=10)
    worker.ensure_group()  # what worker.main does on NOGROUP
    store.set(protocol.MODEL_STATUS_KEY, json.dumps({"version": 1, "rejected": {}}))
    queue(store).submit([b"after"])
    [(_, job)] = worker.next_batch(block_ms=100)
    assert job.image == b"after"


def test_consumers_holding_nothing_are_removed_holders_kept(store):
    jobs = queue(store)
    jobs.submit([b"done"])
    gone = stream(store, "gone")
    [(entry_id, job)] = gone.next_batch(block_ms=100)
    gone.finish([(entry_id, job, None)])  # then it is killed: registered, holding nothing
    time.sleep(CLAIM_IDLE_MS * 3 / 1000)
    jobs.submit([b"in hand"])
    stream(store, "busy").next_batch(block_ms=100)  # holds a job, not yet stale
    stream(store, "scanner").next_batch(block_ms=10)  # finds nothing stale: tidies the group
    assert {c["name"] for c in store.xinfo_consumers(protocol.STREAM, protocol.GROUP)} == {b"busy"}
