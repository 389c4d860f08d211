"""`python -m worker`: batch jobs from Redis, preprocess them, run them through TF Serving, answer."""
import json
import logging
import signal
import threading
import time

import grpc
import numpy as np
import redis

from common import logs, protocol
from common.protocol import Job, Result
from worker import joblog, metrics
from worker.contract import ModelVersions, NoServableVersion
from worker.jobs import Entry, JobStream
from worker.preprocess import ImageError, preprocess
from worker.settings import Settings
from worker.tfserving_client import Prediction, TFServingClient

log = logging.getLogger("worker")

# gRPC codes after which the model server is treated as down (503 to the caller) rather than failing.
UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}
Answered = tuple[bytes, Job, Result | None]
ANSWER_MARGIN_S = 0.5  # how long before a job's deadline its answer goes back, whatever it is


def preprocess_jobs(entries: list[Entry], max_pixels: int,
                    max_decode_bytes: int) -> tuple[list[tuple[bytes, Job, np.ndarray]], list[Answered]]:
    """Splits a batch into images ready for the model and jobs already answered (bad image, expired)."""
    ready, answered = [], []
    now = protocol.now_ms()
    for entry_id, job in entries:
        if job.expired(now):
            metrics.EXPIRED_JOBS.inc()
            answered.append((entry_id, job, None))
            continue
        started = time.perf_counter()
        try:
            ready.append((entry_id, job, preprocess(job.image, max_pixels, max_decode_bytes=max_decode_bytes)))
        except ImageError as exc:
            answered.append((entry_id, job, Result.failure(job.index, exc.code, str(exc))))
        except Exception as exc:  # a decoder failing in a way nobody foresaw fails this image, not the batch
            log.exception("preprocessing failed unexpectedly")
            answered.append((entry_id, job, Result.failure(job.index, protocol.INVALID_IMAGE,
                                                           f"the image could not be processed ({type(exc).__name__})")))
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
    return ready, answered


def ood_fields(prediction: Prediction, row: int) -> dict:
    if prediction.ood_scores is None:
        return {}
    return {"ood_score": round(float(prediction.ood_scores[row]), 4),
            "in_distribution": bool(prediction.in_distribution[row])}


def predict_jobs(ready: list[tuple[bytes, Job, np.ndarray]], versions: ModelVersions) -> list[Answered]:
    """One Predict call for the whole batch. If the model server refuses it, every job gets that
    error; if its answer cannot be read, the batch is retried job by job, so only the jobs that fail
    on their own get an error (and the worker lives on)."""
    metrics.BATCH_SIZE.observe(len(ready))
    started = time.perf_counter()
    try:
        # Answered before the earliest deadline, so its caller still hears a 503 rather than a timeout.
        deadline = min(job.deadline_ms for _, job, _ in ready) / 1000 - ANSWER_MARGIN_S
        prediction = versions.predict(np.stack([pixels for _, _, pixels in ready]), deadline)
        answered = [
            (entry_id, job, Result(index=job.index, model_version=prediction.model_version,
                                   labels=tuple(prediction.labels[row]),
                                   probabilities=tuple(round(float(p), 6) for p in prediction.probabilities[row]),
                                   **ood_fields(prediction, row)))
            for row, (entry_id, job, _) in enumerate(ready)
        ]
        if prediction.ood_scores is not None:
            for score in prediction.ood_scores:
                metrics.OOD_SCORE.observe(float(score))
            metrics.OUT_OF_DISTRIBUTION.inc(int((~prediction.in_distribution).sum()))
        return answered
    except grpc.RpcError as exc:
        metrics.GRPC_ERRORS.labels(exc.code().name).inc()
        log.error("Predict failed: %s %s", exc.code().name, exc.details())
        if exc.code() in UNAVAILABLE_CODES:
            code, message = protocol.MODEL_UNAVAILABLE, "the model server is unavailable; try again shortly"
        else:
            code, message = protocol.INFERENCE_FAILED, f"the model server rejected the batch: {exc.code().name}"
        return [(entry_id, job, Result.failure(job.index, code, message)) for entry_id, job, _ in ready]
    except NoServableVersion as exc:
        return [(entry_id, job, Result.failure(job.index, protocol.MODEL_UNAVAILABLE, f"{exc}; try again shortly"))
                for entry_id, job, _ in ready]
    except Exception as exc:  # e.g. a model version without the `probabilities` output
        log.exception("unreadable Predict answer for a batch of %d", len(ready))
        if len(ready) > 1:
            return [answer for item in ready for answer in predict_jobs([item], versions)]
        entry_id, job, _ = ready[0]
        return [(entry_id, job, Result.failure(job.index, protocol.INFERENCE_FAILED,
                                               f"the model server's answer could not be read ({type(exc).__name__})"))]
    finally:
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)


def process_batch(entries: list[Entry], versions: ModelVersions, settings: Settings) -> list[Answered]:
    started = time.perf_counter()
    ready, answered = preprocess_jobs(entries, settings.max_image_pixels, settings.max_decode_bytes)
    if ready:
        answered += predict_jobs(ready, versions)
    for _, _, result in answered:
        if result is not None:
            metrics.JOBS.labels("ok" if result.ok else result.error_code).inc()
    joblog.log_batch(answered, time.perf_counter() - started)
    return answered


def model_status(versions: ModelVersions) -> dict | None:
    """What the gateway reads: the served version and the rejected ones; None when the model server
    is unreachable or has no version loaded. Raises RpcError when it answered too slowly to tell."""
    try:
        served = versions.refresh()
    except grpc.RpcError as exc:
        metrics.GRPC_ERRORS.labels(exc.code().name).inc()
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return None
        raise
    if not versions.available:
        return None
    return {"version": served, "rejected": {str(v): p for v, p in versions.rejected(versions.available).items()}}


def served_card(versions: ModelVersions, served: int | None) -> str | None:
    """MODEL_CARD_KEY's value for the served version: its card, or null if it was exported
    without one; None while no version is served or its card could not be fetched yet."""
    if served is None:
        return None
    known, card = versions.card(served)
    return json.dumps({"version": served, "card": card}) if known else None


def publish_model_status(store: redis.Redis, versions: ModelVersions, interval_s: float,
                         stop: threading.Event, name: str = "worker") -> None:
    """Keeps MODEL_STATUS_KEY set while the model server has a version loaded, for the gateway's
    readiness and its fast 503 (which also needs "version" not null: one that meets the contract).
    Deleted at once when the model server is unreachable or has no version; a slow answer only
    skips a refresh (the key outlives a few of them)."""
    last_seen = None
    while not stop.is_set():
        try:
            status = model_status(versions)
        except grpc.RpcError:  # too slow to tell: the key expires if this goes on
            stop.wait(interval_s)
            continue
        try:
            channel = json.dumps({"ready": versions.client.connected() and status is not None,
                                  "ms": protocol.now_ms()})
            store.hset(protocol.WORKER_CHANNELS_KEY, name, channel)
            if status is None:
                store.delete(protocol.MODEL_STATUS_KEY, protocol.MODEL_CARD_KEY)
            else:
                card = served_card(versions, status["version"])
                with store.pipeline() as pipe:  # MULTI: never one version's status beside another's card
                    pipe.set(protocol.MODEL_STATUS_KEY, json.dumps(status), ex=protocol.MODEL_STATUS_TTL_S)
                    if card is not None:  # unknown yet: left as it is (GET /model checks its version)
                        pipe.set(protocol.MODEL_CARD_KEY, card, ex=protocol.MODEL_STATUS_TTL_S)
                    pipe.execute()
        except redis.RedisError as exc:
            log.error("could not publish model status: %s", exc)
        if status != last_seen:
            log.info("model server: %s", json.dumps(status) if status else "no available version")
            last_seen = status
        # While no version is seen, look again soon: the gateway answers 503 at once until then.
        stop.wait(interval_s if status else min(interval_s, 0.2))


def keep_claims(stream: JobStream, in_hand: list[bytes], liveness: metrics.Liveness, interval_s: float,
                done: threading.Event) -> None:
    """Keeps the claim on the batch in hand fresh while the main loop is healthy: another worker
    takes it over only after this one died or hung, however long the batch takes."""
    while not done.wait(interval_s):
        held = list(in_hand)
        if held and liveness.alive():
            try:
                stream.keep_claimed(held)
            except redis.RedisError as exc:
                log.error("could not refresh the claim on %d jobs: %s", len(held), exc)


def run(settings: Settings, stop: threading.Event) -> None:
    # The read timeout outlasts the 1 s XREADGROUP block, so only a hung Redis trips it.
    store = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10,
                                 health_check_interval=30)
    client = TFServingClient(settings.tfserving_address, settings.model_name,
                             settings.grpc_timeout_s, settings.grpc_retries)
    stream = JobStream(store, settings.consumer_name, settings.max_batch_size,
                       settings.max_batch_wait_ms, settings.claim_idle_ms)
    liveness = metrics.Liveness(stall_s=max(30.0, 3 * settings.grpc_timeout_s * (settings.grpc_retries + 1)))
    metrics_server = metrics.serve_metrics(settings.metrics_port, liveness)
    versions = ModelVersions(client)
    threading.Thread(target=publish_model_status, name="model-status", daemon=True,
                     args=(store, versions, settings.model_status_interval_s, stop, settings.consumer_name)).start()
    log.info("worker %s: redis %s, model server %s, batches of up to %d (wait %d ms)", settings.consumer_name,
             settings.redis_url.split("@")[-1], settings.tfserving_address, settings.max_batch_size,
             settings.max_batch_wait_ms)
    in_hand: list[bytes] = []
    done = threading.Event()
    threading.Thread(target=keep_claims, name="keep-claims", daemon=True,
                     args=(stream, in_hand, liveness, settings.claim_idle_ms / 4000, done)).start()
    group_ready = False
    while not stop.is_set():
        liveness.beat()
        try:
            if not group_ready:
                stream.ensure_group()
                group_ready = True
            batch = stream.next_batch()
            if batch:
                in_hand[:] = [entry_id for entry_id, _ in batch]
                stream.finish(process_batch(batch, versions, settings))
        except redis.RedisError as exc:
            group_ready = False
            if "NOGROUP" in str(exc):  # Redis restarted empty or was flushed: recreate the group now
                log.warning("the consumer group is gone (%s); recreating it", exc)
                continue
            log.error("redis error: %s; retrying in 1 s", exc)  # restarting: jobs stay pending meanwhile
            stop.wait(1)
        except Exception:  # a bug, not a bad job (those fail alone): the batch stays pending, is
            # reclaimed after claim_idle_ms and dead-lettered if it keeps failing; this worker goes on
            log.exception("batch failed unexpectedly; its jobs stay pending")
            stop.wait(1)
        finally:
            in_hand.clear()
    done.set()
    try:
        stream.leave_group()
        store.hdel(protocol.WORKER_CHANNELS_KEY, settings.consumer_name)
    except redis.RedisError:
        pass
    metrics_server.shutdown()
    client.close()


def main() -> None:
    logs.configure()  # JSON lines on stderr, LOG_LEVEL (common/logs.py)
    stop = threading.Event()
    # Finish the batch in hand, then exit: a SIGTERM during a rollout loses nothing.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(Settings.from_env(), stop)
