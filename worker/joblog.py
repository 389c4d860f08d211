"""The worker's log lines about jobs, named by their public request id (common/protocol.py Job.public_id,
the X-Request-ID the gateway answered with): a warning per job that failed or expired, and one
info line per batch listing the request ids in it (LOG_LEVEL=WARNING keeps only the failures)."""
import logging

from common.protocol import Job, Result

log = logging.getLogger("worker")


def log_batch(answered: list[tuple[bytes, Job, Result | None]], duration_s: float) -> None:
    if not answered:
        return
    ok, versions = 0, set()
    for _, job, result in answered:
        if result is None:
            log.warning("job expired before a worker took it; its caller already had a 504",
                        extra={"request_id": job.public_id, "index": job.index, "outcome": "expired"})
        elif not result.ok:
            log.warning("job failed: %s", result.error_code,
                        extra={"request_id": job.public_id, "index": job.index, "outcome": result.error_code,
                               "error": result.error_message})
        else:
            ok += 1
            versions.add(result.model_version)
    request_ids = list(dict.fromkeys(job.public_id for _, job, _ in answered))  # in order, once each
    log.info("batch of %d jobs from %d requests: %d ok", len(answered), len(request_ids), ok,
             extra={"request_ids": request_ids, "jobs": len(answered), "ok": ok,
                    "model_version": max(versions) if versions else None,
                    "duration_ms": round(duration_s * 1000, 1)})
