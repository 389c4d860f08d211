"""Property-based tests of image decoding (worker/preprocess.py): mutated image files, from the real
test images and from small images encoded here in every format uploads come in, either decode to
uint8 [32, 32, 3] or fail with ImageError (their own job's error answer). Any other exception would
go up through worker/main.py preprocess_jobs as an unexpected failure."""
import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from common import protocol
from worker.preprocess import ImageError, preprocess

ASSETS = Path(__file__).resolve().parents[2] / "tests" / "assets"
LIMIT = 40_000_000
# Pillow warns about corrupt EXIF and TIFF tags and canvases over its own pixel limit: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def seeds() -> dict[str, bytes]:
    frog = Image.open(ASSETS / "frog.jpg").convert("RGB").resize((48, 40))
    rgba = frog.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(frog.size))
    grey16 = Image.fromarray((np.asarray(frog.convert("L"), dtype=np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": (ASSETS / "frog.jpg").read_bytes(),
        "png": (ASSETS / "cifar-ship-32x32.png").read_bytes(),
        "jpeg-progressive-exif": encode(frog, "JPEG", quality=80, progressive=True, exif=exif.tobytes()),
        "png-rgba": encode(rgba, "PNG"),
        "png-16": encode(grey16, "PNG"),
        "png-p-trns": encode(frog.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=3),
        "png-interlaced": encode(frog.convert("LA"), "PNG", interlace=1),
        "gif": encode(frog, "GIF", save_all=True, append_images=[rgba.convert("RGB")], duration=50),
        "webp-lossy": encode(frog, "WEBP", quality=60),
        "webp-lossless-alpha": encode(rgba, "WEBP", lossless=True),
        "bmp": encode(frog, "BMP"),
        "bmp-p": encode(frog.convert("P"), "BMP"),
        "tiff": encode(frog, "TIFF"),
        "tiff-deflate-16": encode(grey16, "TIFF", compression="tiff_deflate"),
        "tiff-float": encode(Image.fromarray(np.asarray(frog.convert("L"), dtype=np.float32) / 3), "TIFF"),
        "tiff-lzw-rgba": encode(rgba, "TIFF", compression="tiff_lzw"),
    }


SEED_NAMES = sorted(seeds())


def assert_decodes_or_fails_its_job(data: bytes) -> None:
    try:
        pixels = preprocess(data, LIMIT)
    except ImageError as exc:
        assert exc.code in (protocol.INVALID_IMAGE, protocol.IMAGE_TOO_LARGE)
        assert str(exc)
        return
    assert isinstance(pixels, np.ndarray)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_every_seed_decodes():
    for name in SEED_NAMES:
        assert preprocess(seeds()[name], LIMIT).shape == (32, 32, 3), name


def flip(data: bytearray, at: int, mask: int) -> None:
    if data:
        data[at % len(data)] ^= mask


def overwrite(data: bytearray, at: int, chunk: bytes) -> None:
    at %= len(data) + 1
    data[at:at + len(chunk)] = chunk


def insert(data: bytearray, at: int, chunk: bytes) -> None:
    data[at % (len(data) + 1):at % (len(data) + 1)] = chunk


def truncate(data: bytearray, at: int, _unused: bytes) -> None:
    del data[at % (len(data) + 1):]


positions = st.integers(0, 2**20)
# Mostly near the start, where the headers are.
header_positions = st.integers(0, 64)
edits = st.one_of(
    st.tuples(st.just(flip), positions | header_positions, st.integers(1, 255)),
    st.tuples(st.just(overwrite), positions | header_positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just(overwrite), header_positions,
              st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x10000, 6324, 0x7FFFFFFF, 0xFFFFFFFF])
              .flatmap(lambda v: st.sampled_from([struct.pack("<I", v), struct.pack(">I", v),
                                                  struct.pack("<H", v & 0xFFFF), struct.pack(">H", v & 0xFFFF)]))),
    st.tuples(st.just(insert), positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just(truncate), positions, st.just(b"")),
)


@FUZZ
@given(st.sampled_from(SEED_NAMES), st.lists(edits, min_size=1, max_size=4))
@example("png", [(truncate, 40, b"")])
@example("jpeg", [(truncate, 2000, b"")])
@example("tiff-float", [(overwrite, 8, b"\xff\xff")])
def test_mutated_files_decode_or_fail_their_own_job(seed, mutations):
    data = bytearray(seeds()[seed])
    for mutate, at, value in mutations:
        mutate(data, at, value)
    assert_decodes_or_fails_its_job(bytes(data))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]], fix_crc: bool) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) if fix_crc else zlib.crc32(kind + body) ^ 1
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(out)


dimensions = st.integers(0, 2**31 - 1) | st.integers(1, 8000) | st.sampled_from([1, 32, 6324, 6325, 2**31 - 1])


@FUZZ
@given(st.sampled_from(["png", "png-rgba", "png-16", "png-p-trns", "png-interlaced"]), dimensions, dimensions,
       st.sampled_from([None, 1, 2, 4, 8, 16]), st.sampled_from([None, 0, 2, 3, 4, 6, 7]), st.booleans())
@example("png-rgba", 6324, 6324, None, None, True)  # a 40 Mpx canvas the data does not fill
@example("png-16", 46340, 46340, None, None, True)  # over the pixel limit
def test_png_with_rewritten_ihdr_decodes_or_fails_its_own_job(seed, width, height, depth, colour, fix_crc):
    chunks = png_chunks(seeds()[seed])
    assert chunks[0][0] == b"IHDR"
    ihdr = bytearray(chunks[0][1])
    ihdr[0:8] = struct.pack(">II", width, height)
    if depth is not None:
        ihdr[8] = depth
    if colour is not None:
        ihdr[9] = colour
    chunks[0] = (b"IHDR", bytes(ihdr))
    assert_decodes_or_fails_its_job(png_from_chunks(chunks, fix_crc))
