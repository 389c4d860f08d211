"""Logs of the gateway and the worker as JSON lines: one object per line, so that one upload can be
followed through every process by its request id (`jq 'select(.request_id == "...")'`).

Each line has time (UTC, ISO 8601, ms), level, logger and message, then whatever the call passed
in `extra=` (request_id, request_ids, status, images, duration_ms...), then exception, if any, as
one string. LOG_LEVEL (environment or common/stack.env, default INFO) sets the level.
"""
import json
import logging
import sys
from datetime import datetime, timezone

from common.settings import env_str

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def level() -> str:
    return env_str("LOG_LEVEL", "INFO").upper()


def dict_config(log_level: str | None = None) -> dict:
    """A logging.config.dictConfig for JSON lines on stderr: the root logger and gunicorn's two
    (complete, since gunicorn merges it into its own defaults key by key)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    log_level = log_level or level()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": handler},
        "root": {"level": log_level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": log_level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }


def configure(log_level: str | None = None) -> None:
    """JSON lines on stderr for this process (the worker; the gateway's gunicorn uses dict_config)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level or level())
