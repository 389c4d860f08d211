"""`make profile-serve`: where one request's CPU goes in the running local stack (`make up`).

Under a closed-loop wrk load (one photo per request, --clients connections, --seconds long), it
reads every stack process's CPU time from /proc before and after (threads and children included)
and samples each Python process with py-spy at --rate Hz. It prints CPU milliseconds per request
for every process (gateway workers, workers, model server, Redis, the load generator), then, per
kind of process, the functions where the samples spent their time (leaf frames, `self`) and the
stages of the request's path they belong to (by the file of the innermost project frame).

    make up; make profile-serve [SECONDS=20]       # then make down
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.bench_serve import ASSETS, STACK_STATE, run_step

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its waited-for children, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def stack_processes() -> dict[str, int]:
    """name -> pid of every process of `make up`'s stack, gunicorn's workers by their own name."""
    if not STACK_STATE.exists():
        raise SystemExit("no stack is up (make up first)")
    processes = {}
    for service in json.loads(STACK_STATE.read_text())["services"]:
        processes[service["name"]] = service["pid"]
        if service["name"] == "gateway":
            for i, child in enumerate(children(service["pid"])):
                processes[f"gateway worker {i}"] = child
    return processes


def kind(name: str) -> str:
    return "gateway worker" if name.startswith("gateway worker") else name.split("-")[0] if name.startswith(
        "worker") else name


def stage(frames: list[str]) -> str:
    """The stage of the request's path a sample is in: the innermost frame of this project's code."""
    for frame in reversed(frames):
        for folder in ("gateway/", "worker/", "common/", "tfserving/"):
            if f"/{folder}" in frame or f"({folder}" in frame:
                return frame.split(" (")[0] + " [" + frame.split("(")[-1].split(":")[0].rsplit("/", 1)[-1] + "]"
    return "outside the project's code"


def profile(processes: dict[str, int], seconds: float, rate: int, folder: Path) -> dict[str, subprocess.Popen]:
    started = {}
    for name, pid in processes.items():
        if name in ("redis",):  # not Python
            continue
        out = folder / f"{name.replace(' ', '-')}.txt"
        started[name] = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--duration", f"{seconds:g}",
             "--rate", str(rate), "--format", "raw", "--nonblocking", "--subprocesses", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return started


def read_samples(path: Path) -> list[tuple[list[str], int]]:
    samples = []
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        samples.append((stack.split(";"), int(count)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://localhost:{os.environ.get('GATEWAY_PORT', '5000')}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second and process")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    photo = [("photo.jpg", (ASSETS / "photo-800x530-upscaled-cifar-frog.jpg").read_bytes())]
    processes = stack_processes()
    run_step(args.url, photo, 8, 2.0)  # warm-up
    with tempfile.TemporaryDirectory() as folder:
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        spies = profile(processes, args.seconds, args.rate, Path(folder))
        step = run_step(args.url, photo, args.clients, args.seconds)
        after = {name: cpu_seconds(pid) for name, pid in processes.items()}
        for spy in spies.values():
            spy.wait(timeout=60)
        samples = {name: read_samples(Path(folder) / f"{name.replace(' ', '-')}.txt") for name in spies}
    requests = step["requests"]
    print(f"{requests} requests in {step['seconds']:.1f} s ({requests / step['seconds']:.0f} req/s), {args.clients} "
          f"clients, p50 {step['p50_us'] / 1000:.1f} ms, p99 {step['p99_us'] / 1000:.1f} ms; "
          f"load average {os.getloadavg()[0]:.2f}")
    total = 0.0
    print(f"\n{'process':<22}{'CPU ms / request':>18}")
    by_kind = collections.defaultdict(float)
    for name in processes:
        ms = (after[name] - before[name]) * 1000 / requests
        by_kind[kind(name)] += ms
        total += ms
        print(f"{name:<22}{ms:>18.2f}")
    wrk_ms = step["loadgen_cpu"] * step["seconds"] * 1000 / requests
    print(f"{'wrk (load generator)':<22}{wrk_ms:>18.2f}\n{'stack total':<22}{total:>18.2f}")
    for group in sorted({kind(n) for n in samples}):
        merged = [s for name in samples if kind(name) == group for s in samples[name]]
        count = sum(c for _, c in merged) or 1
        stages, leaves = collections.Counter(), collections.Counter()
        for frames, c in merged:
            stages[stage(frames)] += c
            leaves[frames[-1].split(" (")[0] + " (" + frames[-1].split("(")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"] += c
        print(f"\n{group} ({by_kind[group]:.2f} ms CPU / request): innermost project frame, then leaf functions")
        for name, c in stages.most_common(args.top):
            print(f"  {c / count:6.1%}  {name}")
        print("  --")
        for name, c in leaves.most_common(args.top):
            print(f"  {c / count:6.1%}  {name}")


if __name__ == "__main__":
    main()
