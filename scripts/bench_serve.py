"""`make bench-serve`: load generator for the running local stack (`make up`), and the same load on
a reference server in the same run.

For each scenario (one ~800x530 JPEG photo, one 32x32 PNG, several photos in one request) and each
concurrency (closed loop: every client sends its next request when the previous answer arrives),
prints throughput, latency percentiles, the mean batch size the workers formed meanwhile and the
CPU the load generator itself used. Then it starts scripts/reference_server.py (the seed's one
process Flask + Keras design), loads it the same way, and prints the stack's throughput as a
multiple of the reference's. Requests only go to localhost URLs; every step is time-bounded.

The load generator keeps its own CPU small, since it shares the 2 cores with the system under test:
request bodies are built before a step (each client cycles through its own few random boundaries),
each client keeps one HTTP/1.1 connection, and the `loadgen cpu` column shows the share of one core
it used (user + system time over wall time).
"""
import argparse
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from scripts.stack import free_port

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
STACK_STATE = REPO / ".stack" / "stack.json"


def multipart_body(images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """Body and Content-Type, with a fresh random boundary as curl, requests and browsers send."""
    boundary = uuid.uuid4().hex
    parts = []
    for filename, data in images:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def scenarios(multi_count: int) -> dict[str, list[tuple[str, bytes]]]:
    photo = (ASSETS / "photo-800x530-upscaled-cifar-frog.jpg").read_bytes()
    png = (ASSETS / "cifar-ship-32x32.png").read_bytes()
    return {
        "photo-800x530-jpeg": [("photo.jpg", photo)],
        "png-32x32": [("ship.png", png)],
        f"photo-x{multi_count}": [(f"photo{i}.jpg", photo) for i in range(multi_count)],
    }


BODIES_PER_CLIENT = 8


def client_loop(host: str, port: int, images: list[tuple[str, bytes]], stop_at: float, latencies: list,
                statuses: list):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    bodies = [multipart_body(images) for _ in range(BODIES_PER_CLIENT)]
    sent = 0
    while time.perf_counter() < stop_at:
        body, content_type = bodies[sent % BODIES_PER_CLIENT]
        sent += 1
        started = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            status = 0
        latencies.append(time.perf_counter() - started)
        statuses.append(status)
    conn.close()


def batch_totals(metrics_urls: list[str]) -> tuple[float, float]:
    """Sum and count of worker_batch_size over all workers."""
    total = count = 0.0
    for url in metrics_urls:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("worker_batch_size_sum "):
                total += float(line.split()[1])
            elif line.startswith("worker_batch_size_count "):
                count += float(line.split()[1])
    return total, count


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_step(url: str, images: list[tuple[str, bytes]], concurrency: int,
             seconds: float) -> tuple[np.ndarray, list[int], float, float]:
    """Latencies, statuses, elapsed seconds and the load generator's CPU share of one core."""
    parsed = urllib.parse.urlsplit(url)
    latencies, statuses = [], []
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=client_loop, args=(parsed.hostname, parsed.port or 80, images,
                                                          stop_at, latencies, statuses))
               for _ in range(concurrency)]
    started, cpu_before = time.perf_counter(), cpu_seconds()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return np.asarray(latencies), statuses, elapsed, (cpu_seconds() - cpu_before) / elapsed


def worker_metrics_urls() -> list[str]:
    if STACK_STATE.exists():
        return json.loads(STACK_STATE.read_text()).get("worker_metrics", [])
    return []


def measure(url: str, chosen: dict, concurrencies: list[int], seconds: float,
            metrics_urls: list[str]) -> dict:
    """Runs every (scenario, concurrency) step against url, printing a row each; returns req/s by step."""
    run_step(url, chosen[next(iter(chosen))], 8, 2.0)  # warm-up: connections, caches
    print(f"{'scenario':<20}{'clients':>8}{'requests':>10}{'req/s':>9}{'img/s':>9}"
          f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch':>7}{'loadgen cpu':>13}")
    rates = {}
    for name, images in chosen.items():
        for concurrency in concurrencies:
            before = batch_totals(metrics_urls)
            latencies, statuses, elapsed, loadgen_cpu = run_step(url, images, concurrency, seconds)
            after = batch_totals(metrics_urls)
            batches = after[1] - before[1]
            mean_batch = f"{(after[0] - before[0]) / batches:.1f}" if batches else "-"
            errors = sum(1 for s in statuses if s != 200)
            p50, p95, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 95, 99))
            rates[name, concurrency] = len(statuses) / elapsed
            print(f"{name:<20}{concurrency:>8}{len(statuses):>10}{len(statuses) / elapsed:>9.1f}"
                  f"{len(statuses) * len(images) / elapsed:>9.1f}{p50:>9.1f}{p95:>9.1f}{p99:>9.1f}{errors:>8}"
                  f"{mean_batch:>7}{loadgen_cpu:>12.0%}", flush=True)
    return rates


def start_reference_server(timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # Its log goes to a file: an unread pipe would block the server once TensorFlow filled it.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "scripts.reference_server", "--port", str(port)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2)
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    process.wait()
    log.seek(0)
    raise SystemExit(f"the reference server did not start: {log.read().decode(errors='replace')[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://localhost:{os.environ.get('GATEWAY_PORT', '5000')}")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each step")
    parser.add_argument("--multi", type=int, default=4, help="images per request in the multi-image scenario")
    parser.add_argument("--scenarios", default="", help="comma-separated subset of the scenario names")
    parser.add_argument("--reference", default="photo-800x530-jpeg,png-32x32",
                        help="scenarios to run on the reference server too ('' skips it)")
    args = parser.parse_args()

    metrics_urls = worker_metrics_urls()
    chosen = scenarios(args.multi)
    if args.scenarios:
        chosen = {name: chosen[name] for name in args.scenarios.split(",")}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"gateway {args.url}; worker metrics {metrics_urls or 'not found (no mean batch size)'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    stack_rates = measure(args.url, chosen, concurrencies, args.seconds, metrics_urls)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    reference = [name for name in args.reference.split(",") if name in chosen]
    if not reference:
        return
    process, url = start_reference_server()
    try:
        print(f"\nreference server {url}: one threaded Flask process, Keras predict per request, the seed's VGG3")
        reference_rates = measure(url, {name: chosen[name] for name in reference}, concurrencies, args.seconds, [])
    finally:
        process.terminate()
        process.wait(timeout=30)
    print("\nstack throughput / reference throughput, same run:")
    print(f"{'scenario':<20}" + "".join(f"{f'{c} clients':>12}" for c in concurrencies))
    for name in reference:
        print(f"{name:<20}" + "".join(f"{stack_rates[name, c] / reference_rates[name, c]:>11.1f}x"
                                      for c in concurrencies))


if __name__ == "__main__":
    main()
