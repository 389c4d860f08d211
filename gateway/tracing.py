"""One request id per POST /predict: returned as X-Request-ID on every answer (success or error),
carried in its jobs (common/protocol.py Job.public_id) and named in the gateway's and the workers'
JSON log lines (common/logs.py), so one upload can be followed through the logs.

A client (or the ingress: ingress-nginx forwards its own $req_id) may send X-Request-ID; a safe
short token is kept, anything else is replaced by a fresh id. The job's result list is always
named after the gateway's own uuid4, so a client-chosen id can neither collide with nor guess
another request's results.
"""
import logging
import re
import uuid

from flask import Response, g, has_request_context

HEADER = "X-Request-ID"
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

log = logging.getLogger("gateway")


def request_ids(header: str | None) -> tuple[str, str]:
    """(public id, internal id) for a request whose X-Request-ID header is `header`."""
    internal = uuid.uuid4().hex
    if header is not None and SAFE_ID.fullmatch(header):
        return header, internal
    return internal, internal


class RequestIdFilter(logging.Filter):
    """Adds the request id of the request being served to records that do not name one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and has_request_context() and "request_id" in g:
            record.request_id = g.request_id
        return True


log.addFilter(RequestIdFilter())


def finish(response: Response, duration_s: float) -> None:
    """Puts the id on the answer and logs the request's one line."""
    response.headers[HEADER] = g.request_id
    status = response.status_code
    error = None
    if status >= 400 and response.is_json:
        error = ((response.get_json(silent=True) or {}).get("error") or {}).get("code")
    log.log(logging.WARNING if status >= 500 else logging.INFO, "POST /predict %d", status,
            extra={"request_id": g.request_id, "status": status, "images": g.get("images", 0),
                   "duration_ms": round(duration_s * 1000, 1), **({"error": error} if error else {})})
