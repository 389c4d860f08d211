"""Pillow preprocessing on real CIFAR-10 images and on the awkward formats uploads come in."""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import protocol
from worker.preprocess import ImageError, preprocess

REPO = Path(__file__).resolve().parents[2]
CIFAR_ZIP = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.zip"
PHOTO = REPO / "tests" / "assets" / "photo-800x530-upscaled-cifar-frog.jpg"
LIMIT = 40_000_000


@pytest.fixture(scope="module")
def cifar_frog() -> Image.Image:
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        return Image.open(io.BytesIO(archive.read("test/frog/0000.jpg"))).convert("RGB")


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
