"""common/logs.py: every record is one line of JSON with time, level, logger, message and its extras."""
import io
import json
import logging
import logging.config

from common import logs


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


def test_the_gunicorn_config_routes_everything_through_one_json_handler(capsys):
    logging.config.dictConfig(logs.dict_config("INFO"))
    try:
        logging.getLogger("gunicorn.error").info("Booting worker with pid: %s", 42)
        logging.getLogger("gateway").info("POST /predict 200", extra={"request_id": "x"})
        lines = capsys.readouterr().err.splitlines()
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "root": {"handlers": [], "level": "WARNING"},
                                   "loggers": {"gunicorn.error": {"handlers": [], "propagate": True}}})
    assert [json.loads(line)["logger"] for line in lines] == ["gunicorn.error", "gateway"]  # once each
