"""Small files that declare large canvases ("decompression bombs" within the pixel limit), and a
child-process probe of the peak memory it takes to preprocess one.

The PNG and TIFF files are written by hand, a row or strip at a time, so making a 6000x6000 RGBA
PNG (144 MB decoded, ~140 KB on disk) never holds its pixels in the test process either.
`peak_rss` runs `preprocess` in a fresh `python -c` and reads the child's VmHWM (peak resident
set): Pillow allocates its pixel buffers in C, where tracemalloc cannot see them.
"""
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# PNG: (colour type, bit depth, bytes per pixel in a scanline) per Pillow mode it opens as.
PNG_LAYOUTS = {
    "1": (0, 1, None),
    "L": (0, 8, 1),
    "I;16": (0, 16, 2),
    "LA": (4, 8, 2),
    "RGB": (2, 8, 3),
    "RGBA": (6, 8, 4),
    "RGBA;16": (6, 16, 8),  # opens as RGBA (Pillow keeps the high bytes)
    "P": (3, 8, 1),
    "P+tRNS": (3, 8, 1),
}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(layout: str, width: int, height: int, fill: int = 0x5a) -> bytes:
    """A valid PNG of one constant byte value, compressed a scanline at a time."""
    colour_type, depth, bpp = PNG_LAYOUTS[layout]
    row_bytes = (width * depth + 7) // 8 if bpp is None else width * bpp
    out = [b"\x89PNG\r\n\x1a\n",
           _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))]
    if colour_type == 3:
        out.append(_chunk(b"PLTE", bytes(range(256)) * 3))
        if layout == "P+tRNS":
            out.append(_chunk(b"tRNS", bytes(range(256))))
    row = b"\x00" + bytes([fill]) * row_bytes  # filter type 0, then the pixels
    packer = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(height):
        idat += packer.compress(row)
    idat += packer.flush()
    out.append(_chunk(b"IDAT", bytes(idat)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


# TIFF: (samples per pixel, bits per sample, SampleFormat, Photometric) per Pillow mode.
TIFF_LAYOUTS = {
    "I;16": (1, 16, 1, 1),
    "I": (1, 32, 2, 1),  # signed 32-bit integer
    "F": (1, 32, 3, 1),  # 32-bit float
    "RGBA": (4, 8, 1, 2),
    "CMYK": (4, 8, 1, 5),
}


def tiff(layout: str, width: int, height: int, rows_per_strip: int = 16, fill: int = 0x20) -> bytes:
    """A little-endian, Deflate-compressed TIFF whose strips all point at one compressed strip."""
    samples, bits, sample_format, photometric = TIFF_LAYOUTS[layout]
    strip_raw = bytes([fill]) * (width * samples * bits // 8 * rows_per_strip)
    strip = zlib.compress(strip_raw, 9)
    strips = -(-height // rows_per_strip)
    last_rows = height - (strips - 1) * rows_per_strip
    last = zlib.compress(strip_raw[:width * samples * bits // 8 * last_rows], 9)
    entries = [  # (tag, type, count, value or bytes)
        (256, 4, 1, width), (257, 4, 1, height),
        (258, 3, samples, [bits] * samples), (259, 3, 1, 8), (262, 3, 1, photometric),
        (273, 4, strips, None), (277, 3, 1, samples), (278, 4, 1, rows_per_strip),
        (279, 4, strips, None), (284, 3, 1, 1), (339, 3, samples, [sample_format] * samples),
    ]
    if layout == "RGBA":
        entries.append((338, 3, 1, 2))  # ExtraSamples: unassociated alpha
    entries.sort()
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    extra = bytearray()
    data_start = ifd_offset + ifd_size

    def place(payload: bytes) -> int:
        offset = data_start + len(extra)
        extra.extend(payload)
        if len(extra) % 2:
            extra.append(0)
        return offset

    strip_at = place(strip)
    last_at = place(last)
    counts = [len(strip)] * (strips - 1) + [len(last)]
    offsets = [strip_at] * (strips - 1) + [last_at]
    ifd = bytearray(struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = offsets
        elif tag == 279:
            value = counts
        fmt = {3: "H", 4: "I"}[kind]
        values = value if isinstance(value, list) else [value]
        payload = struct.pack("<" + fmt * count, *values)
        if len(payload) <= 4:
            ifd += struct.pack("<HHI", tag, kind, count) + payload.ljust(4, b"\x00")
        else:
            ifd += struct.pack("<HHII", tag, kind, count, place(payload))
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + bytes(ifd) + bytes(extra)


PROBE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, PIL.Image
import importlib.util
spec = importlib.util.spec_from_file_location("probe_preprocess", sys.argv[2])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
data = open(sys.argv[3], "rb").read()
kwargs = json.loads(sys.argv[4])
baseline = hwm()
start = time.perf_counter()
try:
    pixels = module.preprocess(data, **kwargs)
    outcome = {"shape": list(pixels.shape), "dtype": str(pixels.dtype)}
except module.ImageError as exc:
    outcome = {"error": exc.code, "message": str(exc)}
except BaseException as exc:
    outcome = {"unexpected": f"{type(exc).__name__}: {exc}"}
outcome.update(baseline=baseline, peak=hwm(), seconds=time.perf_counter() - start)
print(json.dumps(outcome))
"""


def peak_rss(path: Path, module: Path = REPO / "worker" / "preprocess.py", **kwargs) -> dict:
    """Preprocess the file at `path` in a child process; its outcome with baseline and peak VmHWM bytes.

    `baseline` is the child's peak after importing numpy, Pillow and the module and reading the file.
    """
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPO), str(module), str(path), json.dumps(kwargs)],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)
