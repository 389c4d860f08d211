"""`make bench-serve`: load generator for the running local stack (`make up`).

For each scenario (one ~800x530 JPEG photo, one 32x32 PNG, several photos in one request) and each
concurrency (closed loop: every client sends its next request when the previous answer arrives),
prints throughput, latency percentiles and the mean batch size the workers formed meanwhile.
Requests only go to the gateway URL given (localhost by default) and every step is time-bounded.
"""
import argparse
import http.client
import json
import os
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np

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


def client_loop(host: str, port: int, images: list[tuple[str, bytes]], stop_at: float, latencies: list,
                statuses: list):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    while time.perf_counter() < stop_at:
        body, content_type = multipart_body(images)
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


def run_step(url: str, images: list[tuple[str, bytes]], concurrency: int,
             seconds: float) -> tuple[np.ndarray, list[int], float]:
    parsed = urllib.parse.urlsplit(url)
    latencies, statuses = [], []
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=client_loop, args=(parsed.hostname, parsed.port or 80, images,
                                                          stop_at, latencies, statuses))
               for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.asarray(latencies), statuses, time.perf_counter() - started


def worker_metrics_urls() -> list[str]:
    if STACK_STATE.exists():
        return json.loads(STACK_STATE.read_text()).get("worker_metrics", [])
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://localhost:{os.environ.get('GATEWAY_PORT', '5000')}")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each step")
    parser.add_argument("--multi", type=int, default=4, help="images per request in the multi-image scenario")
    parser.add_argument("--scenarios", default="", help="comma-separated subset of the scenario names")
    args = parser.parse_args()

    metrics_urls = worker_metrics_urls()
    chosen = scenarios(args.multi)
    if args.scenarios:
        chosen = {name: chosen[name] for name in args.scenarios.split(",")}
    print(f"gateway {args.url}; worker metrics {metrics_urls or 'not found (no mean batch size)'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    run_step(args.url, chosen[next(iter(chosen))], 8, 2.0)  # warm-up: connections, caches
    print(f"{'scenario':<20}{'clients':>8}{'requests':>10}{'req/s':>9}{'img/s':>9}"
          f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch':>7}")
    for name, images in chosen.items():
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            before = batch_totals(metrics_urls)
            latencies, statuses, elapsed = run_step(args.url, images, concurrency, args.seconds)
            after = batch_totals(metrics_urls)
            batches = after[1] - before[1]
            mean_batch = f"{(after[0] - before[0]) / batches:.1f}" if batches else "-"
            errors = sum(1 for s in statuses if s != 200)
            p50, p95, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 95, 99))
            print(f"{name:<20}{concurrency:>8}{len(statuses):>10}{len(statuses) / elapsed:>9.1f}"
                  f"{len(statuses) * len(images) / elapsed:>9.1f}{p50:>9.1f}{p95:>9.1f}{p99:>9.1f}{errors:>8}{mean_batch:>7}",
                  flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
