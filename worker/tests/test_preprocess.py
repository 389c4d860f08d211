"""Pillow preprocessing on real CIFAR-10 images and on the awkward formats uploads come in."""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from common import protocol
from worker.preprocess import ImageError, decode_estimate, preprocess, reduction
from worker.tests import large_canvas

REPO = Path(__file__).resolve().parents[2]
CIFAR_ZIP = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-png.zip"  # the official pixels
PHOTO = REPO / "tests" / "assets" / "photo-800x530-upscaled-cifar-frog.jpg"
LIMIT = 40_000_000


@pytest.fixture(scope="module")
def cifar_frog() -> Image.Image:
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        return Image.open(io.BytesIO(archive.read("test/frog/0000.png"))).convert("RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_32x32_rgb_comes_through_unchanged(cifar_frog):
    pixels = preprocess(encode(cifar_frog, "PNG"), LIMIT)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert np.array_equal(pixels, np.asarray(cifar_frog))


def test_large_jpeg_draft_decode_matches_full_decode():
    """The reduced-scale JPEG decode must give (nearly) the pixels of a full decode + area resize."""
    data = PHOTO.read_bytes()
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BOX))
    fast = preprocess(data, LIMIT)
    assert fast.shape == (32, 32, 3)
    assert mean_abs_diff(fast, full) < 2


def test_exif_orientation_is_applied(cifar_frog):
    # Stored rotated 90 degrees with EXIF orientation 6 ("rotate 90 CW to view"): must come out upright.
    upright = cifar_frog.resize((256, 128))  # wide, so a missed rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    pixels = preprocess(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), LIMIT)
    expected = np.asarray(upright.resize((32, 32), Image.Resampling.BOX))
    assert mean_abs_diff(pixels, expected) < 8
    ignored = np.asarray(stored.resize((32, 32), Image.Resampling.BOX))
    assert mean_abs_diff(pixels, ignored) > 2 * mean_abs_diff(pixels, expected)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA"])
def test_any_mode_becomes_rgb(cifar_frog, mode):
    image = cifar_frog.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = preprocess(encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})), LIMIT)
    assert pixels.shape == (32, 32, 3)
    assert mean_abs_diff(pixels, np.asarray(image.convert("RGB"))) < 6


def test_transparency_is_composited_on_white():
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert (preprocess(encode(transparent, "PNG"), LIMIT) == 255).all()


def test_16_bit_greyscale_is_scaled_not_clipped():
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    pixels = preprocess(encode(Image.fromarray(ramp), "PNG"), LIMIT)
    assert np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_animated_gif_uses_the_first_frame():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels = preprocess(data, LIMIT)
    assert (pixels[..., 0] > 200).all() and (pixels[..., 2] < 50).all()


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # 16 Mpx in ~16 KB
    with pytest.raises(ImageError) as refused:
        preprocess(bomb, max_pixels=10_000_000)
    assert refused.value.code == protocol.IMAGE_TOO_LARGE


@pytest.mark.parametrize("data", [b"", b"plain text, not an image", PHOTO.read_bytes()[:2000]],
                         ids=["empty", "text", "truncated-jpeg"])
def test_undecodable_data_is_an_invalid_image(data):
    with pytest.raises(ImageError) as refused:
        preprocess(data, LIMIT)
    assert refused.value.code == protocol.INVALID_IMAGE
    assert "object at 0x" not in str(refused.value), "the message is for people, not a Python repr"


def full_size_pipeline(data: bytes) -> np.ndarray:
    """The preprocessing before the early reduction: whole-image transpose and conversion, one BOX resize."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (128, 128))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX))


@pytest.fixture(scope="module")
def large_frog(cifar_frog) -> Image.Image:
    # Large enough to be reduced (by 4 x 2), with partial reduction blocks at the right and bottom.
    return cifar_frog.resize((2131, 1283), Image.Resampling.BICUBIC)


def large_variant(frog: Image.Image, kind: str) -> bytes:
    ramp = Image.linear_gradient("L").resize(frog.size)
    grey = np.asarray(frog.convert("L"), dtype=np.int32)
    if kind == "RGBA":
        rgba = frog.copy()
        rgba.putalpha(ramp)
        return encode(rgba, "PNG")
    if kind == "RGBA-exif-6":
        rgba = frog.copy()
        rgba.putalpha(ramp)
        exif = Image.Exif()
        exif[0x0112] = 6
        return encode(rgba, "PNG", exif=exif.tobytes())
    if kind == "LA":
        return encode(Image.merge("LA", (frog.convert("L"), ramp)), "PNG")
    if kind == "P-transparency":
        return encode(frog.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)
    if kind == "I;16":
        return encode(Image.fromarray((grey * 257 + np.asarray(ramp) // 4).astype(np.uint16)), "PNG")
    if kind == "I":
        return encode(Image.fromarray(grey * 257), "TIFF", compression="tiff_deflate")
    if kind == "F":
        return encode(Image.fromarray(grey.astype(np.float32) * 1.2 - 10), "TIFF")
    return encode(frog, "PNG")


@pytest.mark.parametrize("kind", ["RGBA", "RGBA-exif-6", "LA", "P-transparency", "I;16", "I", "F", "RGB"])
def test_large_image_reduced_before_conversion_matches_the_full_size_conversion(large_frog, kind):
    """Reducing by whole blocks first, then converting, gives the old pixels within 0.5 levels on average."""
    data = large_variant(large_frog, kind)
    assert reduction(Image.open(io.BytesIO(data)).size) == (4, 2)
    pixels = preprocess(data, LIMIT)
    reference = full_size_pipeline(data)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert mean_abs_diff(pixels, reference) < 0.5
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 3


def test_decode_estimate_counts_the_bytes_a_pixel_of_each_mode():
    pixels = 4000 * 3000
    for layout, stored in (("L", 1), ("I;16", 2), ("RGBA", 4), ("P+tRNS", 1)):
        parts = decode_estimate(Image.open(io.BytesIO(large_canvas.png(layout, 4000, 3000))))
        assert parts["pixels"] == stored * pixels and parts["decoder"] == 0, layout
        assert 0 < parts["conversion"] <= 16 * 2**20, "a tile at a time, not a full-size copy"


def test_decode_memory_limit_refuses_by_mode_and_size_before_decoding():
    # Both 6000x6000 and under the pixel limit; as RGBA the pixels alone take 137 MiB, as L 34 MiB.
    rgba, grey = large_canvas.png("RGBA", 6000, 6000), large_canvas.png("L", 6000, 6000)
    assert len(rgba) < 200_000
    with pytest.raises(ImageError) as refused:
        preprocess(rgba, LIMIT, max_decode_bytes=64 * 2**20)
    assert refused.value.code == protocol.IMAGE_TOO_LARGE
    message = str(refused.value)
    assert "6000x6000" in message and "RGBA" in message and "the limit is 64 MiB" in message, message
    assert preprocess(grey, LIMIT, max_decode_bytes=64 * 2**20).shape == (32, 32, 3)


@pytest.mark.parametrize("size", [(1100, 200), (200, 1100), (5000, 60), (60, 5000), (1025, 1023), (3000, 2)])
def test_every_shape_keeps_the_whole_image(cifar_frog, size):
    """Wide, tall, barely reduced and unreduced images: all of the image, squashed, with nothing cut off."""
    data = encode(cifar_frog.resize(size, Image.Resampling.BICUBIC), "PNG")
    pixels = preprocess(data, LIMIT)
    assert pixels.shape == (32, 32, 3)
    assert mean_abs_diff(pixels, full_size_pipeline(data)) < 0.5
