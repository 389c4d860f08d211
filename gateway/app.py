"""Flask app factory for the gateway: `gunicorn -c gateway/gunicorn.conf.py "gateway.app:create_app()"`."""
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import redis
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common import protocol
from common.protocol import Result
from gateway import metrics, tracing
from gateway.jobs import JobQueue, ModelUnavailable, QueueFull, ResultTimeout
from gateway.multipart import MalformedMultipart, boundary_of, parse_parts
from gateway.settings import Settings

log = logging.getLogger("gateway")
BODY_CHUNK_BYTES = 256 * 1024
# The API's OpenAPI 3.1 document (a static file, the contract; tests/test_openapi.py holds the gateway to it)
# and the page that renders it: Swagger UI, vendored under static/swagger/ (Flask serves /static/).
OPENAPI_DOCUMENT = Path(__file__).resolve().parent / "openapi.json"
DOCS_PAGE = Path(__file__).resolve().parent / "static" / "swagger" / "index.html"

# HTTP status for each error code a worker can put in a result.
RESULT_ERROR_STATUS = {
    protocol.INVALID_IMAGE: 422,
    protocol.IMAGE_TOO_LARGE: 422,
    protocol.MODEL_UNAVAILABLE: 503,
    protocol.INFERENCE_FAILED: 502,
    protocol.JOB_FAILED: 502,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers, mimetype="application/json")


def error_body(code: str, message: str) -> dict:
    return {"success": False, "error": {"code": code, "message": message}}


class UploadBudget:
    """Bounds the request bodies one process holds at once, in bytes. Each thread could otherwise
    hold a MAX_UPLOAD_BYTES body (and the copies made while reading it): 32 threads x 10 MiB is
    more than the pod's memory limit. A body is held from reading until its jobs are in Redis."""

    def __init__(self, capacity: int, retry_after_s: int):
        self.capacity, self.free, self.retry_after_s = capacity, capacity, retry_after_s
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, size: int):
        size = min(size, self.capacity)
        with self.changed:
            if not self.changed.wait_for(lambda: self.free >= size, timeout=self.retry_after_s):
                raise ApiError(503, "queue_full", "the gateway is receiving too many large uploads; retry shortly",
                               retry_after=self.retry_after_s)
            self.free -= size
        try:
            yield
        finally:
            with self.changed:
                self.free += size
                self.changed.notify_all()


def ranked_predictions(result: Result, top_k: int) -> list[dict]:
    ranked = sorted(zip(result.labels, result.probabilities), key=lambda pair: pair[1], reverse=True)
    return [{"label": label, "probability": probability} for label, probability in ranked[:top_k]]


def image_body(result: Result, top_k: int) -> dict:
    if not result.ok:
        return error_body(result.error_code, result.error_message)
    body = {"success": True, "model_version": result.model_version,
            "predictions": ranked_predictions(result, top_k), "ood_score": result.ood_score}
    if result.in_distribution is not None:  # versions exported before the out-of-distribution head: no verdict
        body["in_distribution"] = result.in_distribution
    return body


def read_top_k() -> int:
    raw = request.args.get("top_k", "10")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 10:
        raise ApiError(400, "invalid_top_k", "top_k must be an integer from 1 to 10")
    return int(raw)


def read_body(incoming) -> bytearray:
    """The request body, read in chunks straight into one buffer: `request.get_data` holds two
    copies while it reads (chunks, then the joined bytes), which is what bounds memory here."""
    length = incoming.content_length
    if length is None:  # chunked transfer encoding: rare for uploads
        return bytearray(incoming.get_data(cache=False))
    body = bytearray(length)
    stream, view, received = incoming.stream, memoryview(body), 0
    while received < length:
        count = stream.readinto(view[received:received + BODY_CHUNK_BYTES])
        if not count:
            raise ApiError(400, "malformed_multipart", f"the body ended after {received} of {length} bytes")
        received += count
    return body


def read_images(max_images: int) -> list[memoryview]:
    """Every `image` part of the multipart upload, in order: views of the body, not copies."""
    boundary = boundary_of(request.headers.get("Content-Type"))
    try:
        parts = parse_parts(read_body(request), boundary) if boundary else []
    except MalformedMultipart as exc:
        raise ApiError(400, "malformed_multipart", str(exc)) from None
    images = [part for part in parts if part.name == "image"]
    if not images:
        other = sorted({part.name for part in parts})
        hint = f" (got field {', '.join(repr(name) for name in other)})" if other else ""
        raise ApiError(400, "missing_image",
                       f"send the picture as a multipart/form-data file field named 'image'{hint}")
    if len(images) > max_images:
        raise ApiError(400, "too_many_images", f"at most {max_images} images per request, got {len(images)}")
    for index, part in enumerate(images):
        if not part.data:
            raise ApiError(400, "empty_image", f"image {index} ({part.filename!r}) is empty")
    return [part.data for part in images]


def predict_response(results: list[Result], top_k: int, retry_after_s: int) -> Response:
    """One image: the original service's body. Several: one entry per image, in upload order.

    If every image failed, the request fails with the first image's error and its status."""
    if all(not r.ok for r in results):
        first = results[0]
        raise ApiError(RESULT_ERROR_STATUS.get(first.error_code, 500), first.error_code, first.error_message,
                       retry_after=retry_after_s if first.error_code == protocol.MODEL_UNAVAILABLE else None)
    if len(results) == 1:
        return json_response(image_body(results[0], top_k))
    return json_response({"success": all(r.ok for r in results),
                          "results": [image_body(r, top_k) for r in results]})


def deep_readiness(queue: JobQueue) -> Response:
    """200 when Redis answers, the workers see a model version that meets the serving contract and
    every worker heard from lately is connected to the model server."""
    try:
        status = queue.model_status()
        depth, queued_bytes = queue.occupancy()
        unconnected = queue.unconnected_workers()
    except redis.RedisError:
        return json_response({"ready": False, "reason": "redis unreachable"}, 503)
    body = {"queue_depth": depth, "queue_bytes": queued_bytes}
    if status is None:
        return json_response({"ready": False, "reason": "no model version loaded", **body}, 503)
    if status["version"] is None:
        return json_response({"ready": False, "reason": "no loaded model version meets the serving contract",
                              "rejected_versions": status["rejected"], **body}, 503)
    if unconnected:
        return json_response({"ready": False, "reason": f"not connected to the model server yet: {', '.join(unconnected)}",
                              **body}, 503)
    return json_response({"ready": True, "model_version": status["version"],
                          "rejected_versions": status["rejected"], **body})


WEB_PAGE = Path(__file__).resolve().parent / "static" / "index.html"  # GET /: the page (static/app.js)


def model_card_response(store: redis.Redis, retry_after_s: int) -> Response:
    """GET /model: the served version's model card (training/ship/card.py), as the workers publish it
    after checking the version's contract (worker.main.served_card)."""
    raw_status, raw_card = store.mget(protocol.MODEL_STATUS_KEY, protocol.MODEL_CARD_KEY)
    status = json.loads(raw_status) if raw_status else None
    if status is None or status.get("version") is None:
        raise ApiError(503, "model_unavailable", "no model is being served right now; retry shortly",
                       retry_after=retry_after_s)
    version = status["version"]
    record = json.loads(raw_card) if raw_card else None
    if record is None or record.get("version") != version:
        raise ApiError(503, "model_unavailable", f"the card of model version {version} is not known yet; retry shortly",
                       retry_after=retry_after_s)
    if record["card"] is None:
        raise ApiError(404, "no_model_card", f"model version {version} was exported without a model card")
    return json_response({"version": version, **record["card"]})


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    # The read timeout outlasts the longest BLPOP, so only a hung Redis trips it.
    store = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                 socket_timeout=settings.result_timeout_s + 5, health_check_interval=30)
    queue = JobQueue(store, settings.queue_maxlen, settings.queue_max_bytes, settings.result_timeout_s)
    budget = UploadBudget(settings.upload_budget_bytes, settings.retry_after_s)

    def enqueue() -> tuple[str, int]:
        """Reads the upload and queues its images; the body is freed when this returns."""
        with budget.hold(request.content_length or settings.max_upload_bytes):
            images = read_images(settings.max_images_per_request)
            metrics.IMAGES.inc(len(images))
            g.images = len(images)
            try:
                return queue.submit(images, g.job_key, g.request_id), len(images)
            except QueueFull:
                raise ApiError(503, "queue_full", "too many images in progress; retry shortly",
                               retry_after=settings.retry_after_s) from None
            except ModelUnavailable:
                raise ApiError(503, "model_unavailable", "no model is being served right now; retry shortly",
                               retry_after=settings.retry_after_s) from None

    @app.post("/predict")
    def predict():
        top_k = read_top_k()
        request_id, count = enqueue()
        try:
            results = queue.results(request_id, count)
        except ResultTimeout:
            raise ApiError(504, "timeout", f"no result within {settings.result_timeout_s:g} s") from None
        return predict_response(results, top_k, settings.retry_after_s)

    web_page = WEB_PAGE.read_bytes()

    @app.get("/")
    def index():
        """The web page: choose or drop images, see each one's top 5 (it calls POST /predict)."""
        return Response(web_page, mimetype="text/html")

    @app.get("/model")
    def model():
        return model_card_response(store, settings.retry_after_s)

    @app.get("/healthz")
    def healthz():
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        """Ready means this process answers, with a prediction or a JSON error: a Redis or model
        server outage must not pull every gateway out of the load balancer, or clients would get
        the ingress's HTML errors instead of ours. `?deep=1` also needs the dependencies up."""
        if request.args.get("deep") != "1":
            return json_response({"ready": True})
        return deep_readiness(queue)

    @app.get("/metrics")
    def metrics_endpoint():
        body, content_type = metrics.render(queue)
        return Response(body, content_type=content_type)

    openapi_document, docs_page = OPENAPI_DOCUMENT.read_bytes(), DOCS_PAGE.read_bytes()  # read once, at start
    json.loads(openapi_document)  # a broken document stops the gateway from starting, not a request later

    @app.get("/openapi.json")
    def openapi():
        return Response(openapi_document, mimetype="application/json")

    @app.get("/docs")
    def docs():
        return Response(docs_page, mimetype="text/html")

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()
        if request.path == "/predict":  # every answer of /predict carries its id, 405 and 413 included
            g.request_id, g.job_key = tracing.request_ids(request.headers.get(tracing.HEADER))

    @app.after_request
    def count_request(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
        if endpoint == "/predict":
            metrics.PREDICT_SECONDS.observe(time.perf_counter() - g.started)
        if "request_id" in g:
            tracing.finish(response, time.perf_counter() - g.started)
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return json_response(error_body(exc.code, exc.message), exc.status, headers)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc):
        return json_response(error_body("payload_too_large",
                                        f"the request is larger than {settings.max_upload_bytes} bytes"), 413)

    @app.errorhandler(redis.RedisError)
    def queue_down(exc):
        log.error("redis error: %s", exc)
        return json_response(error_body("queue_unavailable", "the job queue is unreachable; retry shortly"), 503,
                             {"Retry-After": str(settings.retry_after_s)})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        methods = getattr(exc, "valid_methods", None)  # a 405 names the route's methods (RFC 9110)
        return json_response(error_body(code, exc.description or exc.name), exc.code,
                             {"Allow": ", ".join(methods)} if methods else None)

    @app.errorhandler(Exception)
    def unexpected(exc):
        log.exception("unhandled error")
        return json_response(error_body("internal_error", "unexpected server error"), 500)

    return app
