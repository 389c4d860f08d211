"""Turns uploaded image bytes into the model's input: uint8 RGB [32, 32, 3].

Speed matters (this runs once per image on the shared CPUs): JPEGs are decoded at reduced scale
with `Image.draft` (libjpeg's DCT scaling: an 800x530 photo decodes 6x faster at 1/4 scale), then
resized with BOX, a plain area average: it uses every source pixel (no aliasing when shrinking a
lot) and is the cheapest antialiased filter. The draft stops at 4x the target size because the
coarsest DCT scale (1/8) drifts from a full-resolution area average (mean error ~3.6 levels on the
test photo, against ~1.4 at 1/4). The whole image is squashed to 32x32 without cropping, like the
original service.

Memory (the worker runs under a 1Gi limit): only JPEG can be decoded at reduced scale, so a small
PNG, TIFF or WebP declaring a large canvas is decoded in full. Before decoding, `decode_estimate`
works out from the header what that will take (the decoded pixels at Pillow's 1, 2 or 4 bytes a
pixel for the mode; the decoder's own buffers for WebP, progressive JPEG, TIFF and RLE BMP; the
conversion below) and beyond `max_decode_bytes` (MAX_DECODE_BYTES, 256 MiB by default) the image is
refused as too large; MAX_IMAGE_PIXELS applies too. After decoding, a large image is box-reduced
by an integer factor per axis that keeps at least 512 pixels a side (16x the target), one tile of
2^18 pixels at a time, each tile converted to RGB (alpha over white, 16/32-bit and float scaled to
8 bits) just before its reduction: no full-size RGB, RGBA, premultiplied, uint32 or float copy is
made, the decoded image is the only full-size buffer. The final BOX resize covers the exact source
extent, so the result is the old whole-image area average to within rounding (mean difference
< 0.5 levels, at most 3).

Peak RSS (VmHWM) preprocessing 6324x6324 files (40.0 Mpx, the MAX_IMAGE_PIXELS limit) of 4-330 KB,
AMD EPYC, Pillow 13.0, interpreter and imports ~29 MiB: before, 641-644 MiB for RGBA/LA PNG,
32-bit and RGBA TIFF and WebP, 565 MiB for 16-bit, 491 MiB for float; after, 188-191 MiB for RGBA/LA/RGB PNG
and 32-bit/float/RGBA/CMYK TIFF, 110-113 MiB for 16-bit, 71-73 MiB for L/P/1; WebP at that size
(libwebp and Pillow hold 16 bytes a pixel) is refused at 33 MiB, and accepted up to ~16 Mpx
(4000x4000: 277 MiB). See worker/tests/test_preprocess_memory.py.
"""
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from common import protocol

MODEL_SIZE = (32, 32)
DRAFT_SIZE = (128, 128)  # JPEG decode scale floor, see above
REDUCED_MIN = 512  # the early reduction keeps at least this many pixels a side (16x MODEL_SIZE)
TILE_PIXELS = 1 << 18  # source pixels converted to RGB at a time during the reduction
DEFAULT_MAX_DECODE_BYTES = 256 * 2**20
WHITE = (255, 255, 255, 255)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Bytes a pixel in Pillow's memory; every other mode (LA and RGB included) takes 4.
STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# What Pillow raises on truncated or corrupt files (worker/tests/test_preprocess_properties.py mutates
# files in every format to look for others).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
ORIENTATION = 0x0112
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(Exception):
    """This one image cannot be used; `code` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:  # Pillow's message would only name an in-memory buffer
        raise ImageError(protocol.INVALID_IMAGE,
                         "not an image format this service reads (JPEG, PNG, GIF, WebP, BMP, TIFF, ...)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(protocol.IMAGE_TOO_LARGE, str(exc)) from None
    except MemoryError:
        raise ImageError(protocol.IMAGE_TOO_LARGE, "out of memory reading the image header") from None
    except DECODE_ERRORS as exc:
        raise ImageError(protocol.INVALID_IMAGE, f"not a readable image file: {exc}") from None
    if image.width * image.height > max_pixels:
        raise ImageError(protocol.IMAGE_TOO_LARGE,
                         f"image is {image.width}x{image.height} pixels; the limit is {max_pixels} pixels")
    return image


def reduction(size: tuple[int, int]) -> tuple[int, int]:
    """Integer box-reduction factors per axis that keep at least REDUCED_MIN pixels a side."""
    return max(1, size[0] // REDUCED_MIN), max(1, size[1] // REDUCED_MIN)


def conversion_bytes_per_pixel(mode: str, info: dict) -> int:
    """Peak bytes a source pixel costs inside `to_rgb` (its copies and temporaries, RGB result included)."""
    if mode in WIDE_MODES or mode in ALPHA_MODES or mode == "P" or "transparency" in info:
        return 24  # e.g. RGBA: the crop, the RGBA copy, the white canvas, the composite, the RGB
    return 8  # the crop and the RGB result


def tiff_buffer_bytes(image: Image.Image) -> int:
    """libtiff's buffer for one strip or tile, at least 4 bytes a pixel (YCbCr and JPEG-in-TIFF decode via RGBA)."""
    def first_int(value) -> int:
        return int(value[0] if isinstance(value, tuple) else value)

    tags = getattr(image, "tag_v2", {})
    width, height = image.size
    try:
        bits = tags.get(258, 1)
        bits_per_pixel = sum(map(int, bits)) if isinstance(bits, tuple) else int(bits) * first_int(tags.get(277, 1))
        pixel_bytes = max(4, -(-bits_per_pixel // 8))
        if 322 in tags and 323 in tags:
            return first_int(tags[322]) * first_int(tags[323]) * pixel_bytes
        return width * pixel_bytes * max(1, min(height, first_int(tags.get(278, height))))
    except (TypeError, ValueError, IndexError):  # malformed tags: allow for the whole image once more
        return 4 * width * height


def decoder_bytes(image: Image.Image, header_size: tuple[int, int]) -> int:
    """Bytes the format's decoder holds besides the decoded image, estimated from the header."""
    width, height = image.size
    fmt = image.format
    if fmt == "WEBP":  # libwebp's canvas and previous-frame copy, then the frame handed to Pillow as bytes
        return 12 * width * height
    if fmt in ("JPEG", "MPO"):
        if not image.info.get("progressive"):
            return 0
        # libjpeg keeps every component's DCT coefficients (2 bytes each) at full scale, whatever the draft.
        layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
        h_max = max(layer[1] for layer in layers) or 1
        v_max = max(layer[2] for layer in layers) or 1
        return sum(math.ceil(header_size[0] * layer[1] / h_max / 8) * math.ceil(header_size[1] * layer[2] / v_max / 8)
                   * 64 * 2 for layer in layers)
    if fmt == "TIFF":  # libtiff decodes a strip or tile at a time into a buffer of its own
        return tiff_buffer_bytes(image)
    if fmt == "BMP":  # the RLE decoder builds the whole image in a bytearray, then copies it to bytes
        return 3 * width * height if image.info.get("compression") in (1, 2) else 0
    if fmt in ("PNG", "GIF"):
        return 0  # decoded a row at a time straight into the image
    return STORAGE_BYTES.get(image.mode, 4) * width * height  # others: allow one more full copy


def decode_estimate(image: Image.Image, header_size: tuple[int, int] | None = None) -> dict[str, int]:
    """Bytes that decoding and converting `image` will need, by part, from its header (after any draft)."""
    width, height = image.size
    factor_x, factor_y = reduction(image.size)
    reduced = -(-width // factor_x) * -(-height // factor_y)
    return {
        "pixels": STORAGE_BYTES.get(image.mode, 4) * width * height,
        "decoder": decoder_bytes(image, header_size or image.size),
        "conversion": (conversion_bytes_per_pixel(image.mode, image.info) * min(width * height, TILE_PIXELS)
                       + 2 * 4 * reduced),
    }


def check_decode_memory(image: Image.Image, max_decode_bytes: int, header_size: tuple[int, int]) -> None:
    parts = decode_estimate(image, header_size)
    total = sum(parts.values())
    if total > max_decode_bytes:
        mib = {name: value / 2**20 for name, value in parts.items()}
        raise ImageError(
            protocol.IMAGE_TOO_LARGE,
            f"decoding this {image.width}x{image.height} {image.format or 'unknown-format'} image (mode {image.mode}) would need "
            f"about {total / 2**20:.0f} MiB (pixels {mib['pixels']:.0f} MiB, decoder {mib['decoder']:.0f} MiB, "
            f"conversion {mib['conversion']:.0f} MiB); the limit is {max_decode_bytes / 2**20:.0f} MiB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: transparency over white, 16/32-bit greyscale scaled (not clipped) to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow's own conversion clips at 255, which would turn most 16-bit images white.
        return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "I":
        return Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        floats = np.nan_to_num(np.asarray(image), nan=0.0)
        return Image.fromarray(np.clip(floats, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def reduce_to_rgb(image: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """RGB of `image` box-reduced by `reduction(image.size)`, converted one tile at a time, and the
    source extent in its pixels: a last, partial reduction block covers only part of its pixel.

    Tiles start at multiples of the factors, so every reduction block lies inside one tile and
    the result is the same as converting the whole image, then reducing it.
    """
    width, height = image.size
    if width * height <= TILE_PIXELS:
        return to_rgb(image), (0, 0, width, height)
    factor_x, factor_y = reduction(image.size)
    tile_h = factor_y * max(1, TILE_PIXELS // (width * factor_y))
    tile_w = width if width * tile_h <= TILE_PIXELS else factor_x * max(1, TILE_PIXELS // (tile_h * factor_x))
    reduced = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
    for top in range(0, height, tile_h):
        for left in range(0, width, tile_w):
            box = (left, top, min(left + tile_w, width), min(top + tile_h, height))
            tile = to_rgb(image.crop(box)).reduce((factor_x, factor_y))
            reduced.paste(tile, (left // factor_x, top // factor_y))
    return reduced, (0, 0, width / factor_x, height / factor_y)


def preprocess(data: bytes, max_pixels: int, *, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """uint8 [32, 32, 3] RGB pixels of the image's first frame, upright per its EXIF orientation."""
    image = open_image(data, max_pixels)
    try:
        header_size = image.size
        # Draft before anything loads pixels; it never goes below the requested size. With a
        # 90-degree EXIF rotation width and height swap, which does not matter for a square size.
        image.draft("RGB", DRAFT_SIZE)
        check_decode_memory(image, max_decode_bytes, header_size)
        image.load()  # the first frame
        orientation = image.getexif().get(ORIENTATION, 1)
        small, extent = reduce_to_rgb(image)
        del image  # the decoded pixels (and the decoder's buffers) go before the final resize
        pixels = small.resize(MODEL_SIZE, Image.Resampling.BOX, box=extent)
        if orientation in TRANSPOSE:  # MODEL_SIZE is square: the same as transposing first, up to rounding
            pixels = pixels.transpose(TRANSPOSE[orientation])
        return np.asarray(pixels, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ImageError(protocol.IMAGE_TOO_LARGE, str(exc)) from None
    except MemoryError:
        raise ImageError(protocol.IMAGE_TOO_LARGE, "out of memory decoding the image") from None
    except DECODE_ERRORS as exc:  # truncated or corrupt data
        raise ImageError(protocol.INVALID_IMAGE, f"image data could not be decoded: {exc}") from None
