"""Property-based tests of the Redis message codec (common/protocol.py): what the gateway writes, the
worker reads back unchanged, and what the worker writes, the gateway reads back unchanged; a stream
entry that is not a job fails only with the exceptions worker/jobs.py parse_entries catches."""
import json

from hypothesis import example, given, settings, strategies as st

from common import protocol
from common.protocol import Job, Result

FAST = settings(max_examples=300, deadline=None)

# Python refuses int() of strings over 4300 digits; far beyond any index or millisecond timestamp.
ints = st.integers(-(2**63), 2**63)
# Every code point, lone surrogates included: JSON escapes them (ensure_ascii) and reads them back.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
# The request id travels as UTF-8, which has no encoding for a lone surrogate (it is a uuid4 hex anyway).
utf8_text = st.text(st.characters(codec="utf-8"), max_size=40)
floats = st.floats(allow_nan=False)  # NaN != NaN, so no value survives a round trip "equal"

# public_id: "" (the gateway's own id), a client's X-Request-ID, or anything else a stream may hold.
public_ids = st.just("") | st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z") | utf8_text
jobs = st.builds(Job, request_id=utf8_text, index=ints, deadline_ms=ints, image=st.binary(max_size=300),
                 public_id=public_ids)
# A version with the out-of-distribution head answers a score and a verdict; an older one neither.
ood_fields = st.just({}) | st.fixed_dictionaries({"ood_score": floats, "in_distribution": st.booleans()})
ok_results = ood_fields.flatmap(lambda ood: st.builds(
    Result, index=ints, model_version=st.none() | ints, labels=st.lists(any_text, max_size=10).map(tuple),
    probabilities=st.lists(floats, max_size=10).map(tuple), **{k: st.just(v) for k, v in ood.items()}))
failed_results = st.builds(Result.failure, index=ints,
                           code=st.sampled_from([protocol.INVALID_IMAGE, protocol.IMAGE_TOO_LARGE,
                                                 protocol.MODEL_UNAVAILABLE, protocol.INFERENCE_FAILED]) | any_text,
                           message=any_text)


@FAST
@given(jobs)
def test_job_fields_round_trip(job):
    fields = job.fields()
    assert all(isinstance(key, bytes) and isinstance(value, bytes) for key, value in fields.items())
    assert Job.from_fields(fields) == job
    assert (protocol.F_PUBLIC_ID in fields) == (job.public_id != job.request_id)


@FAST
@given(jobs)
def test_a_job_from_a_gateway_without_public_ids_reads_back_with_its_request_id(job):
    fields = {key: value for key, value in job.fields().items() if key != protocol.F_PUBLIC_ID}
    old = Job.from_fields(fields)
    assert old.public_id == old.request_id == job.request_id
    assert (old.index, old.deadline_ms, old.image) == (job.index, job.deadline_ms, job.image)


@FAST
@given(jobs)
def test_a_job_whose_image_is_a_view_of_the_upload_reads_back_as_bytes(job):
    # The gateway queues memoryview slices of the request body (gateway/multipart.py); redis-py sends
    # them as they are, and the worker gets bytes back.
    upload = b"head" + job.image + b"tail"
    viewed = Job(job.request_id, job.index, job.deadline_ms, memoryview(upload)[4:4 + len(job.image)], job.public_id)
    as_redis_returns_it = {key: bytes(value) for key, value in viewed.fields().items()}
    assert Job.from_fields(as_redis_returns_it) == job


@FAST
@given(ok_results | failed_results)
@example(Result.failure(0, protocol.INVALID_IMAGE, "\ud800 \x00 \u2028 \"quoted\" \\ é 猫"))
@example(Result(index=3, model_version=None, labels=("cat", ""), probabilities=(float("inf"), -0.0, 5e-324)))
def test_results_round_trip(result):
    raw = result.encode()
    assert isinstance(raw, bytes)
    json.loads(raw)  # plain JSON, readable with redis-cli
    decoded = Result.decode(raw)
    assert decoded == result
    assert decoded.ok == result.ok and decoded.ok == (result.error_code is None)


field_names = st.sampled_from([protocol.F_REQUEST_ID, protocol.F_INDEX, protocol.F_DEADLINE_MS, protocol.F_IMAGE,
                                protocol.F_PUBLIC_ID])
field_values = (st.binary(max_size=30)
                | st.from_regex(rb"\A[ \t]*[+-]?[0-9_]{1,25}[ \t]*\Z")  # int() takes these: "1_0", " 7 "
                | st.sampled_from([b"", b"\xff\xfe", b"1" * 5000, b"\xd9\xa3", b"nan", b"1e3", b"0x10"]))


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(field_names | st.binary(max_size=8), field_values, max_size=6))
@example({protocol.F_REQUEST_ID: b"\xff", protocol.F_INDEX: b"1", protocol.F_DEADLINE_MS: b"1", protocol.F_IMAGE: b""})
@example({protocol.F_REQUEST_ID: b"r", protocol.F_INDEX: b"1" * 5000, protocol.F_DEADLINE_MS: b"1",
          protocol.F_IMAGE: b""})
@example({protocol.F_REQUEST_ID: b"r", protocol.F_INDEX: b"1", protocol.F_DEADLINE_MS: b"1", protocol.F_IMAGE: b"",
          protocol.F_PUBLIC_ID: b"\xff"})
def test_any_stream_entry_is_a_job_or_an_error_the_worker_catches(fields):
    # worker/jobs.py parse_entries drops an entry on exactly these; anything else would kill the worker.
    try:
        job = Job.from_fields(fields)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return
    assert isinstance(job.request_id, str) and isinstance(job.index, int) and isinstance(job.deadline_ms, int)
    assert isinstance(job.public_id, str)
    assert job.image == fields[protocol.F_IMAGE]
