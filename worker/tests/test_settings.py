"""Worker settings that would let two workers process one batch are refused at start-up."""
import pytest

from worker.settings import Settings


def test_defaults_claim_only_after_the_slowest_batch(monkeypatch):
    for name in ("CLAIM_IDLE_MS", "GRPC_TIMEOUT_S", "GRPC_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.claim_idle_ms / 1000 > settings.slowest_batch_s == pytest.approx(5 * 4 + 0.35)


def test_a_claim_time_within_a_batch_is_refused(monkeypatch):
    monkeypatch.setenv("CLAIM_IDLE_MS", "5000")  # the old default, equal to one Predict deadline
    monkeypatch.setenv("GRPC_TIMEOUT_S", "5")
    monkeypatch.setenv("GRPC_RETRIES", "3")
    with pytest.raises(ValueError, match="CLAIM_IDLE_MS=5000 must exceed the slowest batch"):
        Settings.from_env()
