"""The gateway's Prometheus metrics, aggregated over gunicorn's worker processes.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client, so the
counters below are shared through files; the queue and model state are read from Redis at scrape
time, so a dashboard sees a Redis outage (gateway_redis_up 0) while /readyz stays green.
"""
import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

REQUESTS = Counter("gateway_requests_total", "HTTP requests, by endpoint and status code", ["endpoint", "status"])
PREDICT_SECONDS = Histogram("gateway_predict_seconds", "POST /predict latency, whole request",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))
IMAGES = Counter("gateway_images_total", "Images received in POST /predict")


class DependencyCollector:
    def __init__(self, queue):
        self.queue = queue

    def collect(self):
        try:
            (depth, queued_bytes), status = self.queue.occupancy(), self.queue.model_status()
        except Exception:  # Redis down: scrape the other metrics anyway
            yield GaugeMetricFamily("gateway_redis_up", "Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("gateway_redis_up", "Redis answered this scrape", value=1)
        yield GaugeMetricFamily("gateway_queue_depth", "Jobs waiting or in progress in the Redis stream", value=depth)
        yield GaugeMetricFamily("gateway_queue_bytes", "Image bytes waiting or in progress", value=queued_bytes)
        yield GaugeMetricFamily("gateway_model_version", "Version the workers serve (0: none meets the contract "
                                "or none is loaded)", value=(status or {}).get("version") or 0)


def render(queue) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        MultiProcessCollector(registry)
    else:  # a single process (no gunicorn config): its own registry is the whole story
        registry.register(REGISTRY)
    registry.register(DependencyCollector(queue))
    return generate_latest(registry), CONTENT_TYPE_LATEST
