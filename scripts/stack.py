"""The local stack as plain processes: redis-server, the model server, workers, the gateway.

    python -m scripts.stack up      # make up: start everything, wait for /readyz, print a curl to try
    python -m scripts.stack down    # make down: stop what `up` started

Uses `tensorflow_model_server` when it is on PATH, else the local stand-in (tfserving/standin.py).
Logs go to .stack/logs/, one file per process. The end-to-end tests start their stacks with the
same `LocalStack` class, on free ports.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import env_int, env_str
from tfserving.versions import list_versions

REPO = Path(__file__).resolve().parent.parent

STATE_DIR = REPO / ".stack"
STATE_FILE = STATE_DIR / "stack.json"


@dataclass
class Ports:
    gateway: int
    redis: int
    grpc: int
    worker_metrics: int  # worker i serves metrics on worker_metrics + i

    @classmethod
    def from_env(cls) -> "Ports":
        return cls(env_int("GATEWAY_PORT"), env_int("REDIS_PORT"), env_int("TFSERVING_GRPC_PORT"),
                   env_int("WORKER_METRICS_PORT"))


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    metrics_port: int | None = None  # workers only

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        """Signals the service's whole process group (gunicorn's workers too), SIGKILL if it lingers."""
        signal_group(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        signal_group(self.process.pid, signal.SIGKILL)  # whatever is left of the group
        self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def signal_group(pid: int, sig: int) -> bool:
    """False if the group is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_process_group(pid: int, timeout_s: float = 15) -> None:
    """SIGTERM, then SIGKILL after timeout_s, for a group `up` started (not our child: polled, not waited)."""
    deadline = time.monotonic() + timeout_s
    if signal_group(pid, signal.SIGTERM):
        while time.monotonic() < deadline and signal_group(pid, 0):
            time.sleep(0.1)
        signal_group(pid, signal.SIGKILL)


def model_server_command(port: int, model_name: str, model_base_path: Path) -> list[str]:
    flags = [f"--port={port}", "--rest_api_port=0", f"--model_name={model_name}",
             f"--model_base_path={model_base_path.resolve()}", "--file_system_poll_wait_seconds=1",
             # One thread per Predict: the workers' concurrent batches keep both cores busy, and no
             # spinning intra-op threads steal CPU from the rest of the stack (~13% less CPU per image).
             "--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=1"]
    real = shutil.which("tensorflow_model_server")
    return [real, *flags] if real else [sys.executable, "-m", "tfserving.standin", *flags]


@dataclass
class LocalStack:
    run_dir: Path
    ports: Ports
    model_base_path: Path
    model_name: str = "cifar10"
    env: dict = field(default_factory=dict)  # extra settings for every service
    services: list[Service] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    def worker_metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{s.metrics_port}/metrics" for s in self.services if s.metrics_port]

    def start(self, name: str, command: list[str], env: dict | None = None) -> Service:
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        child_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                     "MODEL_NAME": self.model_name, "REDIS_URL": self.redis_url, **self.env, **(env or {})}
        with open(log_path, "ab") as log:
            # A session of its own, so stopping it reaches its children and nothing else.
            process = subprocess.Popen(command, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def start_redis(self) -> Service:
        # noeviction: at maxmemory Redis refuses new jobs (the gateway answers 503) and never drops queued ones.
        return self.start("redis", ["redis-server", "--port", str(self.ports.redis), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--dir", str(self.run_dir),
                                    "--maxmemory", "384mb", "--maxmemory-policy", "noeviction"])

    def start_model_server(self) -> Service:
        return self.start("model-server", model_server_command(self.ports.grpc, self.model_name, self.model_base_path))

    def start_worker(self, index: int, metrics_port: int | None = None) -> Service:
        metrics_port = metrics_port or self.ports.worker_metrics + index
        env = {"TFSERVING_ADDRESS": f"127.0.0.1:{self.ports.grpc}", "WORKER_METRICS_PORT": str(metrics_port),
               "WORKER_NAME": f"worker-{index}-{time.time_ns()}"}
        service = self.start(f"worker-{index}", [sys.executable, "-m", "worker"], env)
        service.metrics_port = metrics_port
        return service

    def start_gateway(self) -> Service:
        return self.start("gateway", [sys.executable, "-m", "gunicorn", "-c", "gateway/gunicorn.conf.py",
                                      "gateway.app:create_app()"],
                          # As in gateway/Dockerfile: large bodies in their own mmaps, returned when freed.
                          {"GUNICORN_BIND": f"127.0.0.1:{self.ports.gateway}", "MALLOC_MMAP_THRESHOLD_": "131072"})

    def start_all(self, workers: int) -> None:
        self.start_redis()
        self.start_model_server()
        for index in range(workers):
            self.start_worker(index)
        self.start_gateway()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/readyz?deep=1", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Until /readyz?deep=1 is green (a model version is served); RuntimeError with the log of a
        service that died, or if time runs out."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            for service in self.services:
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n"
                                       f"{service.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack not ready after {timeout_s:.0f} s; logs in {self.run_dir / 'logs'}")
            time.sleep(0.5)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def up(workers: int, model_base_path: Path) -> int:
    if STATE_FILE.exists():
        print(f"the stack is already up ({STATE_FILE}); run `make down` first", file=sys.stderr)
        return 1
    if not list_versions(model_base_path):
        print(f"no model version under {model_base_path} (expected {model_base_path}/<version>/saved_model.pb); "
              "export one or set MODEL_BASE_PATH", file=sys.stderr)
        return 1
    ports = Ports.from_env()
    busy = [p for p in (ports.gateway, ports.redis, ports.grpc, *range(ports.worker_metrics,
                                                                      ports.worker_metrics + workers))
            if port_in_use(p)]
    if busy:
        print(f"ports already in use: {busy}; stop whatever holds them (or override *_PORT)", file=sys.stderr)
        return 1
    stack = LocalStack(STATE_DIR, ports, model_base_path, model_name=env_str("MODEL_NAME"))
    stack.start_all(workers)
    STATE_FILE.write_text(json.dumps({
        # The start time guards `down` against signalling a recycled pid.
        "services": [{"name": s.name, "pid": s.process.pid, "started": start_time(s.process.pid)}
                     for s in stack.services],
        "worker_metrics": stack.worker_metrics_urls(),
    }, indent=2))
    print(f"starting redis, model server ({' '.join(stack.services[1].process.args[:3])} ...), "
          f"{workers} workers, gateway; logs in {STATE_DIR / 'logs'}/", flush=True)
    try:
        stack.wait_ready(timeout_s=float(os.environ.get("STACK_READY_TIMEOUT_S", "240")))
    except RuntimeError as exc:
        print(f"stack failed to start: {exc}", file=sys.stderr)
        down()
        return 1
    print(f"ready: {stack.gateway_url}/readyz?deep=1 is green. Try:\n"
          f"  curl -X POST -F image=@tests/assets/frog.jpg http://localhost:{ports.gateway}/predict\n"
          f"logs: tail -f {STATE_DIR.relative_to(REPO)}/logs/*.log    stop: make down")
    return 0


def down() -> int:
    if not STATE_FILE.exists():
        print("the stack is not up (no .stack/stack.json)")
        return 0
    state = json.loads(STATE_FILE.read_text())
    for service in reversed(state["services"]):
        if start_time(service["pid"]) == service["started"]:
            stop_process_group(service["pid"])
            print(f"stopped {service['name']} (pid {service['pid']})")
    STATE_FILE.unlink()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "2")))
    parser.add_argument("--model-base-path", type=Path,
                        default=Path(os.environ.get("MODEL_BASE_PATH", REPO / "models" / "cifar10")))
    args = parser.parse_args()
    sys.exit(up(args.workers, args.model_base_path.resolve()) if args.action == "up" else down())


if __name__ == "__main__":
    main()
