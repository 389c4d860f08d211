"""CIFAR-10 in its official "python version" formats: the tarball (downloaded or local) or its
extracted `cifar-10-batches-py/` directory.

    python -m training.recipe.data download DIR    # official tarball, progress bar, md5 check, cached
    python -m training.recipe.data stats DIR       # shapes, class balance, per-channel mean/std
"""

import argparse
import hashlib
import io
import os
import pickle
import secrets
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


class CifarDataError(Exception):
    """A CIFAR-10 file is missing, truncated or not in the official format."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3], RGB
    labels: np.ndarray  # int64 [N]

    def take(self, n):
        return Split(self.images[:n], self.labels[:n])

    def subset(self, indexes):
        return Split(self.images[indexes], self.labels[indexes])


def validation_indexes(labels, size, seed):
    """(train, validation) indexes: `size` images held out, the same share of every class, chosen
    by `seed`; both in their original order."""
    rng = np.random.default_rng([seed, size])
    classes = np.unique(labels)
    per_class = np.full(len(classes), size // len(classes))
    per_class[:size % len(classes)] += 1
    held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class)])
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """A batch file holds dicts of numpy arrays and lists; anything else is refused, so a
    tampered file cannot run code on load (the same guard Keras' CIFAR loader relies on)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _decode_batch(raw: bytes, name: str) -> Split:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated, garbage or hostile pickles all end here
        raise CifarDataError(f"{name}: not a readable CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise CifarDataError(f"{name}: expected a dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise CifarDataError(f"{name}: missing 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CifarDataError(f"{name}: data must be uint8 [N, 3072], found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise CifarDataError(f"{name}: labels must be N values in 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> NHWC
    return Split(np.ascontiguousarray(images), labels)


def _read_member(tar: tarfile.TarFile, name: str, tar_path: Path) -> bytes:
    try:
        member = tar.extractfile(f"{BATCH_DIR}/{name}")
        return member.read()
    except KeyError:
        raise CifarDataError(f"{tar_path}: has no {BATCH_DIR}/{name}") from None
    except Exception as exc:  # zlib, EOF and tar errors all mean the same to the user
        raise CifarDataError(f"{tar_path}: truncated or corrupt archive ({exc})") from None


def _load_from_tarball(path: Path):
    try:
        tar = tarfile.open(path, "r:gz")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CifarDataError(f"{path}: not a readable .tar.gz ({exc})") from None
    with tar:
        parts = [_decode_batch(_read_member(tar, n, path), f"{path}:{n}") for n in TRAIN_BATCHES]
        test = _decode_batch(_read_member(tar, TEST_BATCH, path), f"{path}:{TEST_BATCH}")
    return parts, test


def _load_from_directory(path: Path):
    def read(name):
        file = path / name
        if not file.is_file():
            raise CifarDataError(f"{file}: missing")
        return _decode_batch(file.read_bytes(), str(file))
    return [read(n) for n in TRAIN_BATCHES], read(TEST_BATCH)


def locate(source) -> Path:
    """The batch directory or tarball inside `source` (a data dir, a batch dir or a tarball)."""
    path = Path(source)
    for candidate in (path, path / BATCH_DIR, path / TARBALL):
        if (candidate.is_dir() and (candidate / "batches.meta").exists()) or candidate.is_file():
            return candidate
    raise CifarDataError(f"{path}: no {BATCH_DIR}/ or {TARBALL} here; "
                         f"run `python -m training.recipe.data download {path}` or `make data`")


def load_cifar10(source):
    """(train, test) Splits from a data dir, an extracted batch dir or the official tarball."""
    path = locate(source)
    parts, test = _load_from_tarball(path) if path.is_file() else _load_from_directory(path)
    train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    return train, test


def dataset_label(source):
    """How to name the data in reports: a DATASET.txt beside the batches says what other data it
    is (an older data/ made from a JPEG-compressed copy says so); otherwise it is CIFAR-10."""
    path = Path(source)
    for folder in (path, path.parent):
        label = folder / "DATASET.txt"
        if label.is_file():
            return label.read_text().strip()
    return "CIFAR-10"


JPEG_TEST = "CIFAR-10 test, JPEG q75"


def jpeg_compressed(split, quality=75):
    """`split` through a JPEG encode and decode (Pillow, 4:2:0): the shift users' uploads carry.
    At quality 75 it reproduces the JPEG-compressed copy of CIFAR-10 that some mirrors serve to
    0.65 levels per pixel (that copy is 5.8 levels from the official pixels)."""
    from PIL import Image

    def roundtrip(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("RGB"))
    return Split(np.stack([roundtrip(pixels) for pixels in split.images]), split.labels)


def channel_stats(images: np.ndarray):
    """Per-channel mean and std on the 0-255 scale; call it on the TRAIN split only.
    From each channel's histogram of its 256 values: exact, and 20x faster than a float64 copy of
    the 150 M values."""
    if images.dtype != np.uint8:
        raise TypeError(f"channel_stats takes uint8 images, not {images.dtype}")
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.float64)
    values = np.arange(256.0)
    n = counts.sum(axis=1)
    mean = counts @ values / n
    return mean, np.sqrt((counts * np.square(values - mean[:, None])).sum(axis=1) / n)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(done, total, width=40):
    filled = int(width * done / total) if total else 0
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                     f"{done / 2**20:6.1f}/{total / 2**20:.1f} MiB")
    sys.stderr.flush()


def download(data_dir, url=OFFICIAL_URL, md5=OFFICIAL_MD5) -> Path:
    """Fetch the official tarball into data_dir (cached: a file with the right md5 is kept)."""
    target = Path(data_dir) / TARBALL
    if target.exists() and _md5(target) == md5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Pods of a study starting together on an empty data volume may all download: one file each,
    # renamed into place whole (every copy is the same bytes).
    partial = target.with_name(f"{target.name}.{secrets.token_hex(4)}.part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        total, done = int(response.headers.get("Content-Length", 0)), 0
        for chunk in iter(lambda: response.read(1 << 16), b""):
            out.write(chunk)
            done += len(chunk)
            _progress(done, total)
    sys.stderr.write("\n")
    if _md5(partial) != md5:
        partial.unlink()
        raise CifarDataError(f"{url}: md5 mismatch, the download is corrupt; try again")
    os.replace(partial, target)
    return target


def ensure_cifar10(data_dir) -> Path:
    """The local CIFAR-10 source, downloading the official tarball if there is none."""
    try:
        return locate(data_dir)
    except CifarDataError:
        return download(data_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["download", "stats"])
    parser.add_argument("data_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            print(ensure_cifar10(args.data_dir))
            return
        train, test = load_cifar10(args.data_dir)
    except CifarDataError as exc:
        sys.exit(f"error: {exc}")
    mean, std = channel_stats(train.images)
    print(f"train {train.images.shape} test {test.images.shape}")
    print("train per class:", np.bincount(train.labels, minlength=10).tolist())
    print("train mean", np.round(mean, 2).tolist(), "std", np.round(std, 2).tolist())


if __name__ == "__main__":
    main()
