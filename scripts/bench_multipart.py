"""Per-request CPU and peak memory of the gateway's multipart splitter against werkzeug's parser.

    .venv/bin/python -m scripts.bench_multipart

Uploads as a client sends them: the 800x530 JPEG of tests/assets, once and 8 times; random bytes
making 1 MiB and 10 MiB bodies (one image, and 8 images for 10 MiB). Every request gets a fresh
random boundary (32 hex digits, like urllib3/requests), built outside the timed section, so
neither parser can reuse a compiled regex for it. The body arrives through a stream that copies on
read, as gunicorn's socket reader does. Timed, CPU time of this thread per request (median):

  find        gateway.multipart.parse_parts(body, boundary_of(content type)), the body already read
  find+read   what gateway/app.py read_images does: read_body (chunks into one buffer), then parse_parts
  werkzeug    Request.files as Flask runs it (werkzeug's MultiPartParser on wsgi.input), then
              .read() of every file, since the gateway needs each image's bytes to queue it

Then the peak of traced Python allocations (tracemalloc) for one 10 MiB request, for each path
(find starts from the body already in memory, so its peak is on top of it; werkzeug spools
files over 500 KiB to a temporary file, so its peak is mostly the final read()).
Finishes in well under a minute.
"""
import io
import os
import secrets
import statistics
import subprocess
import time
import tracemalloc
from pathlib import Path

from werkzeug.wrappers import Request

from gateway.app import read_body
from gateway.multipart import boundary_of, parse_parts

PHOTO = Path(__file__).resolve().parents[1] / "tests/assets/photo-800x530-upscaled-cifar-frog.jpg"
MiB = 1024 * 1024
SECONDS_PER_CELL = 1.0
MAX_REPEATS = 400


class SocketBody(io.RawIOBase):
    """wsgi.input that hands out copies, like a socket reader (io.BytesIO.read() can return the very
    bytes object it was made from, which would make reading the body look free)."""

    def __init__(self, body: bytes):
        self.view, self.at = memoryview(body), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), len(self.view) - self.at)
        buffer[:count] = self.view[self.at:self.at + count]
        self.at += count
        return count


def upload(images: list[bytes]) -> tuple[bytes, str]:
    """A body and its Content-Type as requests/urllib3 would send them, with a fresh boundary."""
    boundary = secrets.token_hex(16)
    out = []
    for index, data in enumerate(images):
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="img{index}.jpg"\r\n'
                   f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def environ_for(body: bytes, content_type: str) -> dict:
    return {"REQUEST_METHOD": "POST", "SERVER_NAME": "bench", "SERVER_PORT": "80", "PATH_INFO": "/predict",
            "wsgi.url_scheme": "http", "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": SocketBody(body)}


def run_find(body, content_type, environ):
    return [part.data for part in parse_parts(body, boundary_of(content_type)) if part.name == "image"]


def run_find_read(body, content_type, environ):
    request = Request(environ)
    boundary = boundary_of(request.headers.get("Content-Type"))
    return [part.data for part in parse_parts(read_body(request), boundary) if part.name == "image"]


def run_werkzeug(body, content_type, environ):
    return [storage.read() for storage in Request(environ).files.getlist("image")]


METHODS = {"find": run_find, "find+read": run_find_read, "werkzeug": run_werkzeug}


def cases() -> dict[str, list[bytes]]:
    photo = PHOTO.read_bytes()
    return {
        f"photo {len(photo) // 1024} KiB x1": [photo],
        f"photo {len(photo) // 1024} KiB x8": [photo] * 8,
        "1 MiB x1": [os.urandom(MiB - 300)],
        "10 MiB x1": [os.urandom(10 * MiB - 300)],
        "10 MiB as 8 images": [os.urandom(10 * MiB // 8 - 300) for _ in range(8)],
    }


def time_one(method, images: list[bytes]) -> float:
    body, content_type = upload(images)  # fresh boundary, built untimed
    environ = environ_for(body, content_type)
    start = time.thread_time_ns()
    result = method(body, content_type, environ)
    elapsed = time.thread_time_ns() - start
    assert [bytes(data) for data in result] == images
    return elapsed / 1e6


def median_ms(method, images: list[bytes]) -> tuple[float, int]:
    samples, deadline = [], time.monotonic() + SECONDS_PER_CELL
    while len(samples) < 5 or (time.monotonic() < deadline and len(samples) < MAX_REPEATS):
        samples.append(time_one(method, images))
    return statistics.median(samples), len(samples)


def peak_bytes(method, images: list[bytes]) -> int:
    body, content_type = upload(images)
    environ = environ_for(body, content_type)
    tracemalloc.start()
    try:
        result = method(body, content_type, environ)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                "unknown")


def main() -> None:
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    print("median CPU ms per request (every request with a fresh boundary)")
    header = f"{'upload':<22}{'body':>10}" + "".join(f"{name:>12}" for name in METHODS) + f"{'werkzeug/find+read':>21}"
    print(header)
    print("-" * len(header))
    for label, images in cases().items():
        body_size = len(upload(images)[0])
        row = f"{label:<22}{body_size / MiB:>7.2f}MiB"
        medians = {}
        for name, method in METHODS.items():
            medians[name], _ = median_ms(method, images)
            row += f"{medians[name]:>12.3f}"
        row += f"{medians['werkzeug'] / medians['find+read']:>20.1f}x"
        print(row, flush=True)
    images = cases()["10 MiB x1"]
    print("\npeak traced allocation, one 10 MiB upload (the body is 10.0 MiB):")
    for name, method in METHODS.items():
        print(f"  {name:<12}{peak_bytes(method, images) / MiB:>8.2f} MiB")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
