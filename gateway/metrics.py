"""The gateway's Prometheus metrics, aggregated over gunicorn's worker processes.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client, so the
counters below are shared through files; queue depth is read from Redis at scrape time.
"""
import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

REQUESTS = Counter("gateway_requests_total", "HTTP requests, by endpoint and status code", ["endpoint", "status"])
PREDICT_SECONDS = Histogram("gateway_predict_seconds", "POST /predict latency, whole request",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))
IMAGES = Counter("gateway_images_total", "Images received in POST /predict")


class QueueDepthCollector:
    def __init__(self, depth):
        self.depth = depth

    def collect(self):
        gauge = GaugeMetricFamily("gateway_queue_depth", "Jobs waiting or in progress in the Redis stream")
        try:
            gauge.add_metric([], self.depth())
        except Exception:  # Redis down: scrape the other metrics anyway, without this one
            return
        yield gauge


def render(depth) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        MultiProcessCollector(registry)
    else:  # a single process (no gunicorn config): its own registry is the whole story
        registry.register(REGISTRY)
    registry.register(QueueDepthCollector(depth))
    return generate_latest(registry), CONTENT_TYPE_LATEST
