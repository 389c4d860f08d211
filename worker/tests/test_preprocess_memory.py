"""Peak memory of preprocessing small files that declare large canvases, one mode at a time.

Each file is preprocessed in a child process (large_canvas.peak_rss: Pillow's buffers are invisible
to tracemalloc), which must either return uint8 [32, 32, 3] or refuse the image with ImageError, and
whose peak resident set may grow past its baseline (interpreter, numpy, Pillow, the file) by no more
than MAX_DECODE_BYTES, and by no more than the header-based estimate plus SLACK. Before the early
reduction (commit 8910c05) the RGBA/LA PNGs and 32-bit TIFFs here peaked at ~641 MiB; now ~190 MiB.
"""
import io

import pytest
from PIL import Image

from common import protocol
from worker.preprocess import DEFAULT_MAX_DECODE_BYTES, DRAFT_SIZE, decode_estimate
from worker.tests import large_canvas

LIMIT = 40_000_000
SIDE = 6324  # 39.99 Mpx, the most MAX_IMAGE_PIXELS allows in a square
SLACK = 16 * 2**20  # allocator and decoder overheads the estimate leaves out (measured: under 4 MiB)
MiB = 2**20


def pillow_file(mode: str, side: int, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side), (90, 40, 200, 128)[:len(mode)]).save(buffer, fmt, **options)
    return buffer.getvalue()


CASES = {  # name: (file bytes maker, expected outcome)
    **{f"png-{layout}": (lambda layout=layout: large_canvas.png(layout, SIDE, SIDE), "decoded")
       for layout in large_canvas.PNG_LAYOUTS},
    **{f"tiff-{layout}": (lambda layout=layout: large_canvas.tiff(layout, SIDE, SIDE), "decoded")
       for layout in large_canvas.TIFF_LAYOUTS},
    # One strip for the whole image: libtiff would need a 153 MiB buffer on top of the pixels.
    "tiff-RGBA-one-strip": (lambda: large_canvas.tiff("RGBA", SIDE, SIDE, rows_per_strip=SIDE), "refused"),
    # libwebp and Pillow hold 16 bytes a pixel: 4000x4000 fits the budget, the largest canvas does not.
    "webp-RGBA-4000": (lambda: pillow_file("RGBA", 4000, "WEBP", lossless=True), "decoded"),
    "webp-RGBA-max": (lambda: pillow_file("RGBA", SIDE, "WEBP", lossless=True), "refused"),
    # Progressive: libjpeg keeps the whole image's DCT coefficients, whatever the draft scale.
    "jpeg-progressive-4000": (lambda: pillow_file("RGB", 4000, "JPEG", progressive=True), "decoded"),
}


@pytest.fixture(scope="module")
def canvas_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("large-canvas")


@pytest.mark.parametrize("name", list(CASES))
def test_large_canvas_peak_memory_stays_within_the_estimate_and_budget(canvas_dir, name):
    make, expected = CASES[name]
    path = canvas_dir / name
    path.write_bytes(make())
    assert path.stat().st_size < 400_000, "a small file declaring a large canvas"
    with Image.open(path) as image:
        header_size = image.size
        image.draft("RGB", DRAFT_SIZE)
        estimate = sum(decode_estimate(image, header_size).values())
    outcome = large_canvas.peak_rss(path, max_pixels=LIMIT)
    growth = outcome["peak"] - outcome["baseline"]
    figures = f"{name}: peak {outcome['peak'] / MiB:.0f} MiB, +{growth / MiB:.0f} MiB, estimate {estimate / MiB:.0f} MiB"
    assert "unexpected" not in outcome, outcome["unexpected"]
    if expected == "decoded":
        assert outcome.get("shape") == [32, 32, 3] and outcome["dtype"] == "uint8", (figures, outcome)
        assert growth <= estimate + SLACK, figures
    else:
        assert outcome.get("error") == protocol.IMAGE_TOO_LARGE, (figures, outcome)
        assert "MiB" in outcome["message"] and "limit is 256 MiB" in outcome["message"]
        assert growth < SLACK, f"refused from the header, before decoding; {figures}"
    assert growth <= DEFAULT_MAX_DECODE_BYTES + SLACK, figures
