"""`make bench-serve`: load generator for the running local stack (`make up`), and the same load on
a reference server in the same run.

For each scenario (one ~800x530 JPEG photo, one 32x32 PNG, several photos in one request) and each
concurrency (closed loop: every client sends its next request when the previous answer arrives),
prints throughput, latency percentiles, the mean batch size the workers formed meanwhile and the
CPU the load generator itself used. Then it starts scripts/reference_server.py (the seed's one
process Flask + Keras design), loads it the same way, and prints the stack's throughput as a
multiple of the reference's. Requests only go to localhost URLs; every step is time-bounded.

The load generator is wrk (Debian's, in C: one thread, an event loop over every client's HTTP/1.1
connection, the body built before the step), since it shares the 2 cores with the system under
test; a Python generator took enough CPU to cut the stack's throughput by a fifth. The `loadgen
cpu` column shows the share of one core wrk used (user + system time over wall time).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

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


# wrk (C, one thread, an event loop over every connection) sends the body built beforehand and
# reports through this hook: requests, errors and latency percentiles as one JSON line.
WRK_SCRIPT = """
local body = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = body:read("*a")
body:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration / 1e6, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def run_step(url: str, images: list[tuple[str, bytes]], concurrency: int, seconds: float) -> dict:
    """One closed-loop wrk run: its JSON report, plus `loadgen_cpu`, the share of one core wrk used
    (user + system time over wall time)."""
    body, content_type = multipart_body(images)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "body").write_bytes(body)
        (Path(folder) / "post.lua").write_text(WRK_SCRIPT)
        env = {**os.environ, "BENCH_BODY": str(Path(folder) / "body"), "BENCH_CONTENT_TYPE": content_type}
        started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        process = subprocess.Popen(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s",
                                    "-s", str(Path(folder) / "post.lua"), f"{url}/predict"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = process.communicate(timeout=seconds + 60)
        elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((l for l in out.splitlines() if l.startswith("{")), None)
    if process.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({process.returncode}): {err[-1000:]}{out[-1000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {**json.loads(line), "loadgen_cpu": cpu / elapsed}


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
            step = run_step(url, images, concurrency, seconds)
            after = batch_totals(metrics_urls)
            batches = after[1] - before[1]
            mean_batch = f"{(after[0] - before[0]) / batches:.1f}" if batches else "-"
            errors = step["non_2xx"] + step["socket_errors"]
            rate = step["requests"] / step["seconds"]
            rates[name, concurrency] = rate
            print(f"{name:<20}{concurrency:>8}{step['requests']:>10}{rate:>9.1f}{rate * len(images):>9.1f}"
                  f"{step['p50_us'] / 1000:>9.1f}{step['p95_us'] / 1000:>9.1f}{step['p99_us'] / 1000:>9.1f}"
                  f"{errors:>8}{mean_batch:>7}{step['loadgen_cpu']:>12.0%}", flush=True)
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
