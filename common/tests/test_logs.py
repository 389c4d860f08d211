"""common/logs.py: every record is one line of JSON with time, level, logger, message and its extras."""
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

from common import logs

REPO = Path(__file__).resolve().parents[2]


def emit(logger_name: str, *calls) -> list[dict]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for call in calls:
            call(logger)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_a_line_has_the_fields_and_the_extras():
    [entry] = emit("t.fields", lambda log: log.warning("answered %d", 503, extra={"request_id": "r-1", "images": 2}))
    assert entry["level"] == "WARNING" and entry["logger"] == "t.fields" and entry["message"] == "answered 503"
    assert entry["request_id"] == "r-1" and entry["images"] == 2
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert list(entry)[:4] == ["time", "level", "logger", "message"]


def test_multi_line_messages_and_tracebacks_stay_on_one_line():
    def fail(log):
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("two\nlines", extra={"request_ids": ["a", "b"], "odd": object()})
    [entry] = emit("t.exc", fail)  # one physical line, however many lines the text has
    assert entry["message"] == "two\nlines" and "ValueError: bad" in entry["exception"]
    assert entry["request_ids"] == ["a", "b"] and entry["odd"].startswith("<object")


def test_the_gunicorn_config_routes_everything_through_one_json_handler():
    # In a process of its own: dictConfig replaces the root logger's handlers, pytest's included.
    code = ("import logging, logging.config; from common import logs; "
            "logging.config.dictConfig(logs.dict_config('INFO')); "
            "logging.getLogger('gunicorn.error').info('Booting worker with pid: %s', 42); "
            "logging.getLogger('gateway').info('POST /predict 200', extra={'request_id': 'x'})")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [json.loads(line)["logger"] for line in lines] == ["gunicorn.error", "gateway"]  # once each
    assert json.loads(lines[1])["request_id"] == "x"
