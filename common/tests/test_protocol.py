"""The Redis message contract both sides use, and the settings loader behind it."""
import json

from common import protocol
from common.protocol import Job, Result
from common.settings import env_int, env_str, read_stack_env


def test_job_survives_the_stream_encoding():
    job = Job(request_id="abc123", index=3, deadline_ms=1_700_000_000_123, image=b"\xff\xd8\x00binary\x00")
    fields = job.fields()
    assert set(fields) == {protocol.F_REQUEST_ID, protocol.F_INDEX, protocol.F_DEADLINE_MS, protocol.F_IMAGE}
    assert all(isinstance(v, bytes) for v in fields.values())  # what redis-py hands back
    assert Job.from_fields(fields) == job


def test_a_client_request_id_travels_beside_the_internal_one():
    same = Job("0f" * 16, 0, 1000, b"x")
    assert same.public_id == same.request_id and protocol.F_PUBLIC_ID not in same.fields()
    client = Job("0f" * 16, 0, 1000, b"x", public_id="client-trace_42")
    fields = client.fields()
    assert fields[protocol.F_REQUEST_ID] == b"0f" * 16 and fields[protocol.F_PUBLIC_ID] == b"client-trace_42"
    assert Job.from_fields(fields) == client


def test_job_expiry_uses_its_deadline():
    job = Job("r", 0, deadline_ms=1000, image=b"")
    assert not job.expired(at_ms=999)
    assert job.expired(at_ms=1000)


def test_results_survive_the_encoding():
    ok = Result(index=1, model_version=7, labels=("cat", "dog"), probabilities=(0.25, 0.75))
    failed = Result.failure(2, protocol.INVALID_IMAGE, "not an image")
    assert Result.decode(ok.encode()) == ok and ok.ok
    assert Result.decode(failed.encode()) == failed and not failed.ok
    json.loads(ok.encode())  # plain JSON, readable with redis-cli


def test_key_names_come_from_stack_env():
    stack = read_stack_env()
    assert protocol.STREAM == stack["JOB_STREAM"]
    assert protocol.GROUP == stack["JOB_GROUP"]
    assert protocol.result_key("r1") == stack["RESULT_KEY_PREFIX"] + "r1"


def test_environment_overrides_stack_env(monkeypatch):
    assert env_int("GATEWAY_PORT") == int(read_stack_env()["GATEWAY_PORT"])
    monkeypatch.setenv("GATEWAY_PORT", "5050")
    assert env_int("GATEWAY_PORT") == 5050
    assert env_str("NOT_A_SETTING_ANYWHERE", "fallback") == "fallback"
