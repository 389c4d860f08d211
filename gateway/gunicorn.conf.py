"""gunicorn settings for the gateway, all from gateway.settings (environment, then common/stack.env)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, to import gateway.settings

from common import logs  # noqa: E402
from gateway.settings import Settings  # noqa: E402

settings = Settings.from_env()

bind = settings.bind
workers = settings.web_concurrency
# Threads, not sync workers: each in-flight request mostly waits on Redis for its result.
worker_class = "gthread"
threads = settings.threads
timeout = int(settings.result_timeout_s) + 30
graceful_timeout = int(settings.result_timeout_s) + 5
keepalive = 5
accesslog = "-" if settings.access_log else None
errorlog = "-"
# gunicorn's own lines and the app's as JSON lines on stderr (common/logs.py), LOG_LEVEL the level.
logconfig_dict = logs.dict_config()
proc_name = "cifar10-gateway"
control_socket_disable = True  # the shared default path would clash between gateways on one host

# Metrics from every worker process, summed at scrape time (see gateway/metrics.py). Set here,
# in the master, so workers have it before they import prometheus_client.
owned_metrics_dir = None
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    owned_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")


def on_exit(server):
    if owned_metrics_dir:
        shutil.rmtree(owned_metrics_dir, ignore_errors=True)
