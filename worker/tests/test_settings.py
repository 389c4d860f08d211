"""Worker settings that would let a batch in progress be taken over are refused at start-up."""
import pytest

from worker.settings import Settings


def test_the_default_claim_time_is_accepted(monkeypatch):
    monkeypatch.delenv("CLAIM_IDLE_MS", raising=False)
    assert Settings.from_env().claim_idle_ms == 5000


def test_a_claim_time_too_short_to_refresh_is_refused(monkeypatch):
    monkeypatch.setenv("CLAIM_IDLE_MS", "200")
    with pytest.raises(ValueError, match="CLAIM_IDLE_MS=200 is too short"):
        Settings.from_env()
