"""Folders of image files as the network's input: each file preprocessed as the worker
preprocesses an upload (worker/preprocess.py: decoded, squashed to 32x32 by area averaging), so
images chosen on, trained on and served go through the same pixels."""

from pathlib import Path

import numpy as np


def image_files(folder):
    """Every file under `folder` whose suffix names an image format, in a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder, max_pixels=40_000_000):
    """Every image file under `folder`, as the worker preprocesses an upload: (uint8 [N,32,32,3],
    their paths relative to folder); files the worker would refuse are skipped."""
    from worker.preprocess import ImageError, preprocess
    folder = Path(folder)
    pixels, names = [], []
    for path in image_files(folder):
        try:
            pixels.append(preprocess(path.read_bytes(), max_pixels))
        except ImageError:
            continue
        names.append(str(path.relative_to(folder)))
    return np.stack(pixels) if pixels else np.zeros((0, 32, 32, 3), np.uint8), names


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
