"""worker/joblog.py: a warning per failed or expired job and one info line per batch, by public request id."""
import logging

from common import protocol
from common.protocol import Job, Result
from worker import joblog


def test_a_batch_logs_its_request_ids_once_and_each_failure(caplog):
    caplog.set_level(logging.INFO, "worker")
    client = Job("internal-key", 0, 0, b"", public_id="client-id")
    answered = [
        (b"1-0", client, Result(index=0, model_version=3, labels=("cat",), probabilities=(1.0,))),
        (b"1-1", Job("internal-key", 1, 0, b"", public_id="client-id"),
         Result.failure(1, protocol.INVALID_IMAGE, "not an image")),
        (b"1-2", Job("other", 0, 0, b""), None),
    ]
    joblog.log_batch(answered, 0.0123)
    failed, expired, batch = caplog.records
    assert (failed.levelname, failed.request_id, failed.index, failed.outcome) == (
        "WARNING", "client-id", 1, protocol.INVALID_IMAGE)
    assert (expired.levelname, expired.request_id, expired.outcome) == ("WARNING", "other", "expired")
    assert batch.levelname == "INFO" and batch.request_ids == ["client-id", "other"]
    assert (batch.jobs, batch.ok, batch.model_version, batch.duration_ms) == (3, 1, 3, 12.3)
    assert "internal-key" not in caplog.text  # the result key stays out of the logs


def test_nothing_to_log_for_an_empty_batch(caplog):
    caplog.set_level(logging.DEBUG, "worker")
    joblog.log_batch([], 0)
    assert caplog.records == []
