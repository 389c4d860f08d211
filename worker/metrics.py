"""The worker's Prometheus metrics and its small HTTP server for /metrics and /healthz."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

BATCH_SIZE = Histogram("worker_batch_size", "Images sent to the model server in one Predict call",
                       buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128))
PREPROCESS_SECONDS = Histogram("worker_preprocess_seconds", "Decode and resize time of one image",
                               buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
INFERENCE_SECONDS = Histogram("worker_inference_seconds", "Predict call time for one batch, retries included",
                              buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
JOBS = Counter("worker_jobs_total", "Jobs finished, by outcome (ok or an error code)", ["outcome"])
EXPIRED_JOBS = Counter("worker_jobs_expired_total", "Jobs dropped unprocessed because their deadline had passed")
RECLAIMED_JOBS = Counter("worker_jobs_reclaimed_total", "Jobs taken over from a consumer that stopped answering")
DEAD_LETTERED_JOBS = Counter("worker_jobs_dead_lettered_total",
                             "Jobs set aside after they were delivered MAX_DELIVERIES times without an answer")
SERVED_VERSION = Gauge("worker_model_version", "Model version this worker sends Predict calls to (0: none)")
REJECTED_VERSIONS = Gauge("worker_model_versions_rejected", "Loaded model versions whose signature breaks the contract")
OOD_SCORE = Histogram("worker_ood_score", "Out-of-distribution score of each image answered (versions with the head)",
                      buckets=(0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 10))
OUT_OF_DISTRIBUTION = Counter("worker_images_out_of_distribution_total",
                              "Images answered with in_distribution false: none of the ten classes, by the version's threshold")
GRPC_ERRORS = Counter("worker_grpc_errors_total", "Failed model server calls, by gRPC status", ["code"])


class Liveness:
    """The main loop beats; /healthz fails when it has been stuck for longer than `stall_s`."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_beat < self.stall_s


def serve_metrics(port: int, liveness: Liveness) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                self.reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = liveness.alive()
                self.reply(200 if ok else 503, b'{"status": "ok"}' if ok else b'{"status": "stalled"}',
                           "application/json")
            else:
                self.reply(404, b'{"error": "not found"}', "application/json")

        def reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
