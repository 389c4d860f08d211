"""JSON error backend for ingress-nginx: `python -m gateway.errors` (stdlib only).

The Ingress names this service in `nginx.ingress.kubernetes.io/default-backend` and lists codes
in `custom-http-errors`. ingress-nginx then sends it two kinds of request:

- an error that nginx itself produced (no gateway pod answered: 502, 504; rate limit: 429 or
  503; body over proxy-body-size: 413), with the status in the `X-Code` header;
- the client's request itself, without `X-Code`, while the gateway Service has no ready pod
  at all. That one gets ERRORS_DEFAULT_STATUS (404 unless set; the Kubernetes manifests set 503).

Every path and method gets the gateway's error body, `{"success": false, "error": {"code": ...,
"message": ...}}`, with that status, so clients see the same JSON errors whether the gateway
or the proxy in front of it answered. Settings (environment): ERRORS_BIND (0.0.0.0:8080),
ERRORS_DEFAULT_STATUS (404), RETRY_AFTER_S (1, sent with 429 and 503, as the gateway does).
"""
import http
import json
import os
import re
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The gateway's error vocabulary (README, API) for what a proxy can answer on its behalf.
CODES = {
    400: ("bad_request", "the proxy could not read the request"),
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "method not allowed"),
    408: ("timeout", "the request was not received in time"),
    413: ("payload_too_large", "request body too large"),
    429: ("rate_limited", "too many requests from this client; retry later"),
    500: ("internal_error", "internal error in the proxy"),
    502: ("bad_gateway", "no gateway instance answered; retry later"),
    503: ("service_unavailable", "the service is unavailable; retry later"),
    504: ("timeout", "the gateway did not answer in time"),
}
RETRY_AFTER = {429, 503}
DRAIN_LIMIT = 64 * 1024 * 1024  # request bodies up to this are read before answering


def status_of(x_code: str | None, default: int) -> int:
    """The status ingress-nginx asks for (X-Code), if it is an error status; else the default."""
    try:
        code = int((x_code or "").strip())
    except ValueError:
        return default
    return code if 400 <= code <= 599 else default


def body_for(status: int) -> dict:
    if status in CODES:
        code, message = CODES[status]
    else:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        code, message = re.sub(r"[^a-z]+", "_", phrase.lower()).strip("_"), phrase.lower()
    return {"success": False, "error": {"code": code, "message": message}}


def make_handler(default_status: int, retry_after_s: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cifar10-errors"
        sys_version = ""

        def answer(self):
            self.drain()
            status = status_of(self.headers.get("X-Code"), default_status)
            payload = json.dumps(body_for(status)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            if status in RETRY_AFTER:
                self.send_header("Retry-After", str(retry_after_s))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def drain(self):
            """Reads the request body (the whole upload, when the gateway has no pod), so that
            answering does not reset a connection the proxy is still writing to."""
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding") or (length and not length.isdigit()):
                self.close_connection = True
                return
            remaining = int(length or 0)
            if remaining > DRAIN_LIMIT:
                self.close_connection = True
                return
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = answer

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            sys.stderr.write("errors: %s %s\n" % (self.address_string(), format % args))

    return Handler


def serve(bind: str, default_status: int, retry_after_s: int) -> ThreadingHTTPServer:
    host, _, port = bind.rpartition(":")
    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), make_handler(default_status, retry_after_s))
    server.daemon_threads = True
    return server


def main() -> None:
    bind = os.environ.get("ERRORS_BIND", "0.0.0.0:8080")
    default_status = status_of(os.environ.get("ERRORS_DEFAULT_STATUS"), 404)
    server = serve(bind, default_status, int(os.environ.get("RETRY_AFTER_S", "1")))
    # PID 1 in a container ignores SIGTERM unless it handles it: exit at once (nothing to drain).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"errors: JSON error backend on {bind}, default status {default_status}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
