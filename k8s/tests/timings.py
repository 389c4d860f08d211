"""How long the gateway and the worker may take to stop, computed by their own code.

The shutdown rules (policy.check_shutdown, test_compose) compare grace periods with these, so a
change to gateway/gunicorn.conf.py, worker/settings.py, the TF Serving client's backoff or the
env files is seen without any number copied into the tests.
"""
import ast
import functools
import json
import os
import subprocess
import sys

from k8s.tests.manifests import ROOT

GUNICORN_CONF = ROOT / "gateway" / "gunicorn.conf.py"
TFSERVING_CLIENT = ROOT / "worker" / "tfserving_client.py"
# What the relations leave beyond the computed times: the gateway's last bytes after gunicorn's
# graceful_timeout, and the worker's Redis writes (acknowledging the batch, leaving the group).
GATEWAY_MARGIN_S = 5
WORKER_MARGIN_S = 10


def _run(code: str, env: dict) -> dict:
    """Runs `code` (which prints JSON) in a fresh interpreter with only `env` (and PATH) set."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": os.environ.get("PATH", ""),
                                             **{k: str(v) for k, v in env.items()}})
    if result.returncode != 0:
        raise RuntimeError(f"settings do not load under this environment:\n{result.stderr}")
    return json.loads(result.stdout)


@functools.lru_cache(maxsize=None)
def _gateway(env: tuple) -> dict:
    code = ("import json, runpy; conf = runpy.run_path('gateway/gunicorn.conf.py'); "
            "print(json.dumps({'graceful_timeout_s': conf['graceful_timeout'], "
            "'result_timeout_s': conf['settings'].result_timeout_s}))")
    # Set, so the config does not create a metrics directory of its own.
    return _run(code, {**dict(env), "PROMETHEUS_MULTIPROC_DIR": "unused"})


def gateway(env: dict) -> dict:
    """gunicorn's graceful_timeout (and RESULT_TIMEOUT_S) under the gateway's environment."""
    return _gateway(tuple(sorted(env.items())))


def client_backoff_s() -> float:
    """TFServingClient's default backoff_s, read from its source (no gRPC import)."""
    tree = ast.parse(TFSERVING_CLIENT.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TFServingClient")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names = [a.arg for a in init.args.args]
    defaults = dict(zip(names[len(names) - len(init.args.defaults):], init.args.defaults))
    return float(ast.literal_eval(defaults["backoff_s"]))


@functools.lru_cache(maxsize=None)
def _worker(env: tuple) -> dict:
    # Any validation of its own in Settings is skipped: the relations are checked here, with
    # messages that name the settings, whether or not worker/settings.py checks them too.
    code = ("import json; from worker.settings import Settings; "
            "Settings.__post_init__ = lambda self: None; s = Settings.from_env(); "
            "print(json.dumps({'grpc_timeout_s': s.grpc_timeout_s, 'grpc_retries': s.grpc_retries, "
            "'claim_idle_ms': s.claim_idle_ms}))")
    values = _run(code, dict(env))
    retries, backoff = values["grpc_retries"], client_backoff_s()
    values["attempts_s"] = values["grpc_timeout_s"] * (retries + 1)
    # Exponential backoff between attempts: backoff_s * 2**attempt after each failed one but the last.
    values["slowest_batch_s"] = values["attempts_s"] + sum(backoff * 2 ** a for a in range(retries))
    return values


def worker(env: dict) -> dict:
    """The worker's settings that bound a batch, and its slowest batch: every Predict attempt
    timing out, GRPC_TIMEOUT_S x (GRPC_RETRIES + 1), plus the backoff between attempts."""
    return _worker(tuple(sorted(env.items())))
