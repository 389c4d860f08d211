"""`make chaos` and `make soak`: the local stack under load while its processes fail, and for a long time.

    python -m scripts.chaos chaos [--seconds 60] [--clients 8] [--workers 2] [--out runs/chaos]
    python -m scripts.chaos soak [--seconds 600] [--rate R] [--out runs/soak]

Each starts its own stack (scripts.stack.LocalStack) on free ports in a temporary run directory,
serving a copy of the shipped default model (the highest version under models/cifar10) as version
1, with RESULT_TIMEOUT_S=10, GRPC_TIMEOUT_S=2, GRPC_RETRIES=1, CLAIM_IDLE_MS=5000 and the defaults
otherwise (2 gunicorn workers of 32 threads). Its logs are copied to <out>/logs/ at the end.

Load: client threads post tests/assets/frog.jpg to /predict with `requests`, one new connection per
request as curl does (--keep-alive: one connection per client), client timeout RESULT_TIMEOUT_S + 10 s.
Every answer is classified: 200 with predictions; a documented JSON error (502 inference_failed or
job_failed, 503 queue_full, model_unavailable or queue_unavailable with Retry-After, 504 timeout);
anything else (not JSON, another status or code, a 503 without Retry-After); or no answer at all
(connection error, or no answer within the client timeout).

chaos: closed loop (each client sends its next request when the previous one is answered) while a
schedule spread over the run injects, in this order:
  worker-kill     SIGKILL to the worker holding the most jobs (XPENDING); the script starts a new
                  one 2 s later, as Kubernetes' restartPolicy would; its unacknowledged jobs wait for
                  another worker to reclaim them after CLAIM_IDLE_MS
  redis-restart   redis-server stopped (SIGTERM) and a fresh one started on the same port: the stream,
                  the consumer group, the model status and queued results are lost, as with a pod
                  restart without persistence
  model-server-pause  SIGSTOP to the model server for 10 s, then SIGCONT: a hung server (the gRPC
                  connections stay open and calls hit their deadlines), not a refused connection
  gateway-sigterm SIGTERM to every gunicorn worker process (the master's children); the master
                  starts new ones
  model-server-restart  SIGKILL to the model server and a fresh one started on the same port, as
                  a TF Serving pod restart: the workers' channels back off meanwhile; `listening_s`
                  is when the new one accepts connections, and every answer after it should be a 200
                  within 2 s (jobs wait for the channel until their deadline rather than fail)
Recovery of a fault: among the requests answered between the fault and the next fault (or the end
of the load), take the last one sent that did not get a 200; the fault has recovered at the moment
the first of the next 3 consecutive requests (in the order they were sent) got its 200. With no
failure in that window, that is the first 3 consecutive 200s sent after the fault. Exit status
1 if any request got no answer, any answer was undocumented, or a fault did not recover in its window.

soak: measures capacity with a short closed loop (unless --rate), then paces the clients at half
of it for --seconds, sampling every few seconds the RSS (/proc/<pid>/status VmRSS) of every process
of every service's process group and Redis' used_memory (INFO memory). Reports start and end RSS
and the least-squares slope in MiB/min over the second half of the run (after warm-up), writes
rss.png. Slopes are reported, not asserted; exit status 1 if any answer was undocumented or missing.

Both write report.json and report.md under --out and print the CPU model and load average.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis
import requests

from common import protocol
from scripts.stack import LocalStack, Ports, Service, free_port, port_in_use
from tfserving.versions import list_versions

REPO = Path(__file__).resolve().parent.parent
FROG = REPO / "tests" / "assets" / "frog.jpg"
SHIPPED_BASE = REPO / "models" / "cifar10"

RESULT_TIMEOUT_S = 10
SETTINGS = {"RESULT_TIMEOUT_S": str(RESULT_TIMEOUT_S), "GRPC_TIMEOUT_S": "2", "GRPC_RETRIES": "1",
            "CLAIM_IDLE_MS": "5000"}
CLIENT_TIMEOUT_S = RESULT_TIMEOUT_S + 10
# The failures the API documents for a valid image (README, "API"); anything else is undocumented.
DOCUMENTED_FAILURES = {502: {"inference_failed", "job_failed"},
                       503: {"queue_full", "model_unavailable", "queue_unavailable"},
                       504: {"timeout"}}
RECOVERY_STREAK = 3
WORKER_RESTART_DELAY_S = 2.0
MODEL_SERVER_PAUSE_S = 10.0
MAX_EXAMPLES = 5


# ---------------------------------------------------------------- load


@dataclass
class Outcome:
    sent: float  # seconds since the load started
    answered: float
    kind: str  # ok | documented | undocumented | no_answer
    key: str  # "200", "503 model_unavailable", "connection_error", ...
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.answered - self.sent


def classify(response: requests.Response) -> tuple[str, str, str]:
    status = response.status_code
    content_type = response.headers.get("Content-Type", "")
    snippet = f"{status} {content_type!r}: {response.text[:300]!r}"
    body = None
    if content_type == "application/json":
        try:
            body = response.json()
        except ValueError:
            pass
    if not isinstance(body, dict):
        return "undocumented", f"{status} not JSON", snippet
    if status == 200:
        if body.get("success") is True and body.get("predictions"):
            return "ok", "200", ""
        return "undocumented", "200 without predictions", snippet
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if body.get("success") is not False or not isinstance(code, str) or not error.get("message"):
        return "undocumented", f"{status} not the error shape", snippet
    if code not in DOCUMENTED_FAILURES.get(status, ()):
        return "undocumented", f"{status} {code}", snippet
    if status == 503 and not response.headers.get("Retry-After"):
        return "undocumented", f"503 {code} without Retry-After", snippet
    return "documented", f"{status} {code}", ""


class Load:
    """Client threads posting the frog: closed loop, or paced at `rate` requests/s in all."""

    def __init__(self, url: str, clients: int, rate: float | None = None, keep_alive: bool = False):
        self.url, self.clients, self.rate, self.keep_alive = f"{url}/predict", clients, rate, keep_alive
        self.image = FROG.read_bytes()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.t0 = 0.0
        self.cpu_before = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> "Load":
        self.t0, self.cpu_before = time.monotonic(), cpu_seconds()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> float:
        """Stops sending, waits for the answers in flight; returns the load generator's CPU share of one core."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
        return (cpu_seconds() - self.cpu_before) / max(self.now(), 1e-9)

    def client(self, index: int) -> None:
        poster = requests.Session() if self.keep_alive else requests
        interval = self.clients / self.rate if self.rate else 0.0
        next_at = self.now() + interval * index / self.clients
        while not self.stopping.is_set():
            if interval:
                if self.stopping.wait(max(0.0, next_at - self.now())):
                    break
                next_at = max(next_at + interval, self.now() - interval)  # late: no catch-up burst
            sent = self.now()
            try:
                response = poster.post(self.url, files={"image": ("frog.jpg", self.image, "image/jpeg")},
                                       timeout=CLIENT_TIMEOUT_S)
                kind, key, detail = classify(response)
            except requests.Timeout as exc:
                kind, key, detail = "no_answer", "client_timeout", repr(exc)[:300]
            except requests.RequestException as exc:
                kind, key, detail = "no_answer", "connection_error", repr(exc)[:300]
            with self.lock:
                self.outcomes.append(Outcome(sent, self.now(), kind, key, detail))

    def sorted_outcomes(self) -> list[Outcome]:
        with self.lock:
            return sorted(self.outcomes, key=lambda o: o.sent)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tally(outcomes: list[Outcome]) -> dict:
    by_kind = {kind: Counter(o.key for o in outcomes if o.kind == kind)
               for kind in ("documented", "undocumented", "no_answer")}
    ok = [o.latency for o in outcomes if o.kind == "ok"]
    examples = lambda kind: [f"t={o.sent:.1f}s {o.key}: {o.detail}"  # noqa: E731
                             for o in outcomes if o.kind == kind][:MAX_EXAMPLES]
    return {
        "sent": len(outcomes),
        "ok_200": len(ok),
        "documented_errors": dict(sorted(by_kind["documented"].items())),
        "undocumented": dict(sorted(by_kind["undocumented"].items())),
        "undocumented_examples": examples("undocumented"),
        "no_answer": {"connection_error": by_kind["no_answer"]["connection_error"],
                      "client_timeout": by_kind["no_answer"]["client_timeout"]},
        "no_answer_examples": examples("no_answer"),
        "latency_200_ms": ({"p50": round(float(np.percentile(ok, 50)) * 1000, 1),
                            "p99": round(float(np.percentile(ok, 99)) * 1000, 1),
                            "max": round(max(ok) * 1000, 1)} if ok else {}),
    }


# ---------------------------------------------------------------- the stack


def start_stack(run_dir: Path, workers: int) -> LocalStack:
    """A stack of its own on free ports, serving a copy of the shipped default model as version 1."""
    versions = list_versions(SHIPPED_BASE)
    if not versions:
        raise SystemExit(f"no model version under {SHIPPED_BASE}")
    base = run_dir / "models"
    base.mkdir(parents=True)
    shutil.copytree(SHIPPED_BASE / str(versions[-1]), base / ".staging-1")
    (base / ".staging-1").rename(base / "1")  # complete before the model server can see it
    ports = Ports(gateway=free_port(), redis=free_port(), grpc=free_port(), worker_metrics=0)
    stack = LocalStack(run_dir, ports, base, env=SETTINGS)
    try:
        stack.start_redis()
        stack.start_model_server()
        for index in range(workers):
            stack.start_worker(index, metrics_port=free_port())
        stack.start_gateway()
        stack.wait_ready(timeout_s=240)
    except BaseException:
        stack.stop_all()
        raise
    return stack


def service(stack: LocalStack, name: str) -> Service:
    return next(s for s in stack.services if s.name == name)


def replace(stack: LocalStack, old: Service) -> Service:
    """A fresh process in place of a stopped or dead one, as a restartPolicy would start."""
    stack.services.remove(old)
    if old.name == "redis":
        return stack.start_redis()
    if old.name == "model-server":
        return stack.start_model_server()
    return stack.start_worker(int(old.name.split("-")[1]), metrics_port=old.metrics_port)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children(pid: int) -> list[int]:
    return [p for p in all_pids() if (stat := proc_stat(p)) and stat[1] == str(pid)]


def group_members(pgid: int) -> list[int]:
    return sorted(p for p in all_pids() if (stat := proc_stat(p)) and stat[2] == str(pgid) and stat[0] != "Z")


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), "unknown")
    except OSError:
        model = "unknown (no lscpu)"
    return {"cpu_model": model, "cpus": os.cpu_count()}


def prepare_run(out: str, kind: str) -> tuple[Path, Path, dict]:
    """The report folder, a fresh run folder for the stack, and the machine's facts (printed)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    info = {**machine(), "load_average_before": load_average()}
    print(f"cpu: {info['cpu_model']} x{info['cpus']}; load average before: {info['load_average_before']}", flush=True)
    return Path(out), Path(tempfile.mkdtemp(prefix=f"{kind}-")), info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def finish(stack: LocalStack | None, run_dir: Path, out: Path) -> None:
    if stack:
        stack.stop_all()
    if (run_dir / "logs").is_dir():
        shutil.copytree(run_dir / "logs", out / "logs", dirs_exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def sigterm_exits() -> None:
    """SIGTERM (a test's timeout, `kill`) unwinds like Ctrl-C, so the stack is stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# ---------------------------------------------------------------- chaos


@dataclass
class Fault:
    name: str
    description: str
    weight: float  # share of the run until the next fault
    at_s: float = 0.0  # when it was injected, seconds since the load started
    done_s: float = 0.0  # when the injection (restart, SIGCONT) finished
    note: str = ""
    listening_s: float | None = None  # model-server-restart: when the new server accepted connections


def fault_plan() -> list[Fault]:
    return [
        Fault("worker-kill", "SIGKILL the worker holding jobs, new one 2 s later", 1.0),
        Fault("redis-restart", "redis-server stopped, fresh empty one on the same port", 1.0),
        Fault("model-server-pause", f"SIGSTOP model server {MODEL_SERVER_PAUSE_S:g} s, then SIGCONT", 2.0),
        Fault("gateway-sigterm", "SIGTERM every gunicorn worker; the master respawns them", 1.0),
        Fault("model-server-restart", "SIGKILL the model server, a fresh one on the same port", 1.5),
    ]


def busiest_worker(stack: LocalStack, within_s: float = 2.0) -> tuple[str, int]:
    """The worker holding the most unacknowledged jobs (XPENDING), polled for up to within_s until one
    holds some, so the kill loses work in flight; worker-0 if none does."""
    store = redis.Redis(port=stack.ports.redis, socket_timeout=2)
    deadline = time.monotonic() + within_s
    while True:
        try:
            consumers = store.xpending(protocol.STREAM, protocol.GROUP)["consumers"]
        except redis.RedisError:
            consumers = []
        held = [(c["pending"], c["name"].decode()) for c in consumers if c["pending"]]
        if held:
            pending, consumer = max(held)
            name = "-".join(consumer.split("-")[:2])  # WORKER_NAME is worker-<index>-<ns>
            if any(s.name == name for s in stack.services):
                return name, pending
        if time.monotonic() > deadline:
            return "worker-0", 0
        time.sleep(0.005)


def inject(fault: Fault, stack: LocalStack, mark, now) -> str:
    """Injects the fault, calling mark() at the moment it strikes; returns what was done. `now`:
    the load's clock, for the moments a fault records."""
    if fault.name == "worker-kill":
        name, pending = busiest_worker(stack)
        victim = service(stack, name)
        mark()
        victim.stop(signal.SIGKILL, timeout_s=5)
        time.sleep(WORKER_RESTART_DELAY_S)
        new = replace(stack, victim)
        return f"killed {name} (pid {victim.process.pid}) holding {pending} jobs, started pid {new.process.pid}"
    if fault.name == "redis-restart":
        old = service(stack, "redis")
        mark()
        old.stop(signal.SIGTERM)
        new = replace(stack, old)
        return f"stopped pid {old.process.pid} (exit {old.process.returncode}), started pid {new.process.pid}"
    if fault.name == "model-server-pause":
        pid = service(stack, "model-server").process.pid
        mark()
        os.killpg(pid, signal.SIGSTOP)
        try:
            time.sleep(MODEL_SERVER_PAUSE_S)
        finally:
            os.killpg(pid, signal.SIGCONT)
        return f"pid {pid} stopped and continued"
    if fault.name == "model-server-restart":
        old = service(stack, "model-server")
        mark()
        old.stop(signal.SIGKILL, timeout_s=5)
        new = replace(stack, old)
        while not port_in_use(stack.ports.grpc):
            if not new.alive():
                return f"killed pid {old.process.pid}; the new one exited with {new.process.returncode}"
            time.sleep(0.02)
        fault.listening_s = round(now(), 2)
        return f"killed pid {old.process.pid}, pid {new.process.pid} listening after {fault.listening_s - fault.at_s:.1f} s"
    if fault.name == "gateway-sigterm":
        master = service(stack, "gateway").process.pid
        workers = children(master)
        mark()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        return f"SIGTERM to gunicorn workers {workers} of master {master}"
    raise ValueError(fault.name)


def recovery(outcomes: list[Outcome], start: float, end: float) -> dict:
    """Outcomes sorted by send time; the fault's window is [start, end) (see the module docstring)."""
    window = [o for o in outcomes if start <= o.answered < end]
    failures = [o for o in window if o.kind != "ok"]
    last_failure = max((o.sent for o in failures), default=None)
    candidates = [o for o in window if o.sent >= start and (last_failure is None or o.sent > last_failure)]
    recovered = None
    for i in range(len(candidates) - RECOVERY_STREAK + 1):
        if all(o.kind == "ok" for o in candidates[i:i + RECOVERY_STREAK]):
            recovered = round(candidates[i].answered - start, 2)
            break
    return {"recovered_s": recovered,
            "failures": dict(sorted(Counter(o.key for o in failures).items())),
            "failures_answered_s": ([round(min(o.answered for o in failures) - start, 2),
                                     round(max(o.answered for o in failures) - start, 2)] if failures else None),
            "slowest_answer_s": round(max((o.latency for o in window), default=0.0), 2)}


def chaos(args) -> int:
    plan = fault_plan()
    warm_up = max(3.0, 0.08 * args.seconds)
    unit = (args.seconds - warm_up) / sum(f.weight for f in plan)
    pause_slot = unit * next(f.weight for f in plan if f.name == "model-server-pause")
    if pause_slot < MODEL_SERVER_PAUSE_S + 4:
        shortest = (MODEL_SERVER_PAUSE_S + 4) * (args.seconds - warm_up) / pause_slot + warm_up
        raise SystemExit(f"--seconds {args.seconds:g} is too short for the schedule (at least {shortest:.0f})")
    schedule, at = [], warm_up
    for fault in plan:
        schedule.append(at)
        at += unit * fault.weight

    out, run_dir, info = prepare_run(args.out, "chaos")
    stack = None
    try:
        stack = start_stack(run_dir, args.workers)
        print(f"stack ready at {stack.gateway_url} (run dir {run_dir}); {args.clients} clients for "
              f"{args.seconds:g} s; faults at {', '.join(f'{t:.1f}' for t in schedule)} s", flush=True)
        load = Load(stack.gateway_url, args.clients, keep_alive=args.keep_alive).start()
        try:
            for fault, at in zip(plan, schedule):
                time.sleep(max(0.0, at - load.now()))
                fault.note = inject(fault, stack, lambda: setattr(fault, "at_s", round(load.now(), 2)), load.now)
                fault.done_s = round(load.now(), 2)
                print(f"  {fault.at_s:6.1f} s  {fault.name}: {fault.note}", flush=True)
            time.sleep(max(0.0, args.seconds - load.now()))
        finally:
            loadgen_cpu = load.stop()
        info["load_average_after"] = load_average()
        alive = {s.name: s.alive() for s in stack.services}
    finally:
        finish(stack, run_dir, out)

    outcomes = load.sorted_outcomes()
    faults = []
    for i, fault in enumerate(plan):
        end = plan[i + 1].at_s if i + 1 < len(plan) else args.seconds
        faults.append({**{k: v for k, v in asdict(fault).items() if k != "weight"},
                       **recovery(outcomes, fault.at_s, end)})
    report = {"command": "chaos", "seconds": args.seconds, "clients": args.clients, "workers": args.workers,
              "keep_alive": args.keep_alive, "settings": SETTINGS, "client_timeout_s": CLIENT_TIMEOUT_S,
              **info, "loadgen_cpu": round(loadgen_cpu, 2), "services_alive_at_end": alive,
              "requests": tally(outcomes), "faults": faults}
    problems = []
    if sum(report["requests"]["no_answer"].values()):
        problems.append(f"requests without an answer: {report['requests']['no_answer']}")
    if report["requests"]["undocumented"]:
        problems.append(f"undocumented answers: {report['requests']['undocumented']}")
    for fault in faults:
        if fault["recovered_s"] is None:
            problems.append(f"{fault['name']} did not recover before the next fault or the end")
        elif fault["listening_s"] is not None and fault["recovered_s"] - (fault["listening_s"] - fault["at_s"]) > 2:
            problems.append(f"{fault['name']}: all 200 only {fault['recovered_s'] - fault['listening_s'] + fault['at_s']:.1f} s "
                            "after the new model server listened (at most 2 s)")
    if not all(alive.values()):
        problems.append(f"services dead at the end: {[n for n, a in alive.items() if not a]}")
    report["problems"] = problems
    report["passed"] = not problems
    write_timeline(out, outcomes)
    write_report(out, report, chaos_markdown(report))
    return 0 if report["passed"] else 1


def requests_markdown(r: dict) -> list[str]:
    errors = ", ".join(f"{k}: {v}" for k, v in r["documented_errors"].items()) or "none"
    undocumented = ", ".join(f"{k}: {v}" for k, v in r["undocumented"].items()) or "none"
    lines = ["| requests sent | 200 | documented 502/503/504 | undocumented | no answer: connection error "
             "| no answer: client timeout | 200 latency p50 / p99 / max ms |",
             "|---|---|---|---|---|---|---|",
             f"| {r['sent']} | {r['ok_200']} | {errors} | {undocumented} | {r['no_answer']['connection_error']} "
             f"| {r['no_answer']['client_timeout']} | "
             + (" / ".join(str(r["latency_200_ms"][k]) for k in ("p50", "p99", "max")) if r["latency_200_ms"]
                else "-") + " |"]
    for example in r["undocumented_examples"] + r["no_answer_examples"]:
        lines.append(f"- `{example}`")
    return lines


def header(report: dict) -> list[str]:
    return [f"CPU: {report['cpu_model']} ({report['cpus']} cores); load average before "
            f"{report['load_average_before']}, after {report['load_average_after']}; load generator "
            f"{report['loadgen_cpu']:.0%} of one core.", ""]


def chaos_markdown(report: dict) -> str:
    lines = [f"# chaos: {report['seconds']:g} s, {report['clients']} closed-loop clients, "
             f"{report['workers']} workers", "", *header(report), *requests_markdown(report["requests"]), "",
             "| fault | at s | injection | recovered after s | non-200 in its window | slowest answer s |",
             "|---|---|---|---|---|---|"]
    for f in report["faults"]:
        failures = ", ".join(f"{k}: {v}" for k, v in f["failures"].items()) or "none"
        recovered = "**not recovered**" if f["recovered_s"] is None else f"{f['recovered_s']:.2f}"
        lines.append(f"| {f['name']} | {f['at_s']:.1f} | {f['description']} | {recovered} | {failures} "
                     f"| {f['slowest_answer_s']:.2f} |")
    lines += ["", "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["problems"])]
    return "\n".join(lines) + "\n"


def write_timeline(out: Path, outcomes: list[Outcome]) -> None:
    """Every request: when it was sent and answered (seconds since the load started), and how."""
    with open(out / "requests.csv", "w") as csv:
        csv.write("sent_s,answered_s,kind,key\n")
        for o in outcomes:
            csv.write(f"{o.sent:.3f},{o.answered:.3f},{o.kind},{o.key}\n")


def write_report(out: Path, report: dict, markdown: str) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown)
    print("\n" + markdown + f"\nreport: {out / 'report.md'}, {out / 'report.json'}; logs: {out / 'logs'}/")


# ---------------------------------------------------------------- soak


class Sampler(threading.Thread):
    """RSS of every process of every service's process group, and Redis' used_memory, every interval_s."""

    def __init__(self, stack: LocalStack, load: Load, interval_s: float):
        super().__init__(daemon=True)
        self.stack, self.load, self.interval_s = stack, load, interval_s
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self.redis_memory: list[tuple[float, float]] = []
        self.stopping = threading.Event()
        self.store = redis.Redis(port=stack.ports.redis, socket_timeout=5)

    def label(self, service: Service, pid: int) -> str:
        if service.name == "gateway":
            return "gateway master" if pid == service.process.pid else f"gateway worker {pid}"
        return service.name if pid == service.process.pid else f"{service.name} child {pid}"

    def sample(self) -> None:
        now = self.load.now()
        for svc in list(self.stack.services):
            for pid in group_members(svc.process.pid):
                if (rss := rss_mib(pid)) is not None:
                    self.rss.setdefault(self.label(svc, pid), []).append((now, rss))
        try:
            self.redis_memory.append((now, self.store.info("memory")["used_memory"] / 2**20))
        except redis.RedisError:
            pass

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.interval_s)


def slope_mib_per_min(series: list[tuple[float, float]], after_s: float) -> float | None:
    points = [(t, v) for t, v in series if t >= after_s]
    if len(points) < 3:
        return None
    t, v = np.array(points).T
    return round(float(np.polyfit(t / 60, v, 1)[0]), 3)


def soak(args) -> int:
    out, run_dir, info = prepare_run(args.out, "soak")
    stack = None
    try:
        stack = start_stack(run_dir, args.workers)
        capacity = None
        rate = args.rate
        if rate is None:
            probe_s = min(15.0, max(3.0, 0.05 * args.seconds))
            probe = Load(stack.gateway_url, 8, keep_alive=args.keep_alive).start()
            time.sleep(probe_s)
            probe.stop()
            ok = [o for o in probe.sorted_outcomes() if o.kind == "ok"]
            capacity = round(len(ok) / probe_s, 1)
            rate = max(1.0, capacity / 2)
            print(f"capacity: {capacity} req/s with 8 closed-loop clients over {probe_s:g} s", flush=True)
        print(f"soak: {rate:.1f} req/s from {args.clients} paced clients for {args.seconds:g} s", flush=True)
        load = Load(stack.gateway_url, args.clients, rate=rate, keep_alive=args.keep_alive)
        sampler = Sampler(stack, load, interval_s=min(5.0, max(1.0, args.seconds / 60)))
        load.start()
        sampler.start()
        try:
            time.sleep(args.seconds)
        finally:
            sampler.stopping.set()
            sampler.join()
            loadgen_cpu = load.stop()
        info["load_average_after"] = load_average()
    finally:
        finish(stack, run_dir, out)

    half = args.seconds / 2
    processes = {}
    for label, series in sampler.rss.items():
        processes[label] = {"start_mib": round(series[0][1], 1), "end_mib": round(series[-1][1], 1),
                            "first_s": round(series[0][0], 1), "last_s": round(series[-1][0], 1),
                            "slope_mib_per_min": slope_mib_per_min(series, half)}
    redis_memory = {"start_mib": round(sampler.redis_memory[0][1], 2) if sampler.redis_memory else None,
                    "end_mib": round(sampler.redis_memory[-1][1], 2) if sampler.redis_memory else None,
                    "slope_mib_per_min": slope_mib_per_min(sampler.redis_memory, half)}
    outcomes = load.sorted_outcomes()
    report = {"command": "soak", "seconds": args.seconds, "clients": args.clients, "workers": args.workers,
              "capacity_req_s": capacity, "rate_req_s": round(rate, 1),
              "achieved_req_s": round(len(outcomes) / args.seconds, 1), "settings": SETTINGS,
              "sample_interval_s": sampler.interval_s, **info, "loadgen_cpu": round(loadgen_cpu, 2),
              "requests": tally(outcomes), "processes": processes, "redis_used_memory": redis_memory,
              "growing_over_1_mib_per_min": sorted(label for label, p in processes.items()
                                                   if (p["slope_mib_per_min"] or 0) > 1.0)}
    problems = []
    if sum(report["requests"]["no_answer"].values()):
        problems.append(f"requests without an answer: {report['requests']['no_answer']}")
    if report["requests"]["undocumented"]:
        problems.append(f"undocumented answers: {report['requests']['undocumented']}")
    report["problems"] = problems
    report["passed"] = not problems
    plot(sampler, out / "rss.png", half)
    write_timeline(out, outcomes)
    write_report(out, report, soak_markdown(report))
    return 0 if report["passed"] else 1


def soak_markdown(report: dict) -> str:
    capacity = f"capacity {report['capacity_req_s']} req/s (closed loop, 8 clients), " if report["capacity_req_s"] \
        else ""
    lines = [f"# soak: {report['seconds']:g} s at {report['rate_req_s']} req/s ({capacity}achieved "
             f"{report['achieved_req_s']}), {report['workers']} workers", "", *header(report),
             *requests_markdown(report["requests"]), "",
             f"RSS sampled every {report['sample_interval_s']:g} s; slope = least squares over the second half.", "",
             "| process | start MiB | end MiB | slope MiB/min (2nd half) |", "|---|---|---|---|"]
    for label, p in sorted(report["processes"].items()):
        slope = "-" if p["slope_mib_per_min"] is None else f"{p['slope_mib_per_min']:+.3f}"
        lines.append(f"| {label} | {p['start_mib']:.1f} | {p['end_mib']:.1f} | {slope} |")
    r = report["redis_used_memory"]
    slope = "-" if r["slope_mib_per_min"] is None else f"{r['slope_mib_per_min']:+.3f}"
    lines += [f"| Redis used_memory | {r['start_mib']} | {r['end_mib']} | {slope} |", "",
              "Over 1 MiB/min: " + (", ".join(report["growing_over_1_mib_per_min"]) or "none"), "",
              "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["problems"])]
    return "\n".join(lines) + "\n"


def plot(sampler: Sampler, path: Path, half_s: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss_axes, redis_axes) = plt.subplots(2, 1, figsize=(10, 8), sharex=True,
                                                 gridspec_kw={"height_ratios": [3, 1]})
    for label, series in sorted(sampler.rss.items()):
        t, v = np.array(series).T
        rss_axes.plot(t / 60, v - v[0], label=f"{label} (from {v[0]:.0f} MiB)")
    rss_axes.set_ylabel("RSS change since first sample (MiB)")
    rss_axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    rss_axes.set_title("RSS per process of the stack under soak load (dotted: start of the slope fit)")
    if sampler.redis_memory:
        t, v = np.array(sampler.redis_memory).T
        redis_axes.plot(t / 60, v, color="tab:red")
    redis_axes.set_ylabel("Redis used_memory (MiB)")
    redis_axes.set_xlabel("minutes")
    for axes in (rss_axes, redis_axes):
        axes.axvline(half_s / 60, color="grey", linestyle=":", linewidth=1)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chaos_parser = commands.add_parser("chaos", help="faults injected under closed-loop load")
    chaos_parser.add_argument("--seconds", type=float, default=60)
    chaos_parser.add_argument("--clients", type=int, default=8)
    chaos_parser.add_argument("--out", default="runs/chaos")
    soak_parser = commands.add_parser("soak", help="memory of every process under steady load")
    soak_parser.add_argument("--seconds", type=float, default=600)
    soak_parser.add_argument("--rate", type=float, default=None, help="requests/s (default: half the capacity)")
    soak_parser.add_argument("--clients", type=int, default=8)
    soak_parser.add_argument("--out", default="runs/soak")
    for sub in (chaos_parser, soak_parser):
        sub.add_argument("--workers", type=int, default=2)
        sub.add_argument("--keep-alive", action="store_true", help="one connection per client (default: one per request)")
    args = parser.parse_args()
    sigterm_exits()
    sys.exit(chaos(args) if args.command == "chaos" else soak(args))


if __name__ == "__main__":
    main()
