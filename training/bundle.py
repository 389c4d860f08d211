"""A portable GPU run: one folder that trains a configuration under JAX on a machine with JAX and
no network, and whose run directory comes back for `make export`.

    make gpu-bundle                                   # = python -m training.bundle build --out dist/gpu-bundle
    # copy dist/gpu-bundle to the GPU machine, then there:
    ./run.sh default /somewhere/runs/default [--epochs 5 ...]   # any training.train option
    # copy /somewhere/runs/default back, then here:
    make export RUN=runs/default

The folder holds the training code (code/training), the wheels a bare JAX installation lacks
(wheels/: keras, optree and namex always; absl-py, rich and its parts, h5py, packaging and Pillow,
installed only where missing), CIFAR-10 as the JPEG files of this workplace's copy in the order
of data/ (data/: their common header once, 623 bytes, and the rest of each file concatenated and
xz-compressed: 17.9 MB, against 18.6 MB for the files as one tar.xz -9 and 62 MB as the zip),
run.sh and MANIFEST.json. On the GPU machine,
run.sh installs the wheels into work/site (pip, no index), decodes the images once into
work/cifar10 (the official batch layout) and checks that they are the very pixels of data/ (a
sha256 of the decoded arrays), then runs `python -m training.train` under KERAS_BACKEND=jax. The
run directory gets metrics.csv, state.json, history.png (where matplotlib is installed; `make
export` draws it otherwise), checkpoints and weights.float16.npz, the trained network that
export needs.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import lzma
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from training.data import BATCH_DIR, TEST_BATCH, TRAIN_BATCHES, _NumpyOnlyUnpickler, load_cifar10

LIMIT_BYTES = 60 * 10**6
REPO = Path(__file__).resolve().parents[1]
DEFAULT_JPEG_ZIP = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.zip"
# Distribution -> the module it provides, for every wheel the bundle carries. Keras, optree and
# namex are installed in any case (the code is tested with these versions); the others only where
# the GPU machine lacks them. numpy and ml_dtypes come with JAX.
ALWAYS = {"keras": "keras", "optree": "optree", "namex": "namex"}
IF_MISSING = {"absl-py": "absl", "rich": "rich", "markdown-it-py": "markdown_it", "mdurl": "mdurl",
              "pygments": "pygments", "h5py": "h5py", "packaging": "packaging", "pillow": "PIL"}
PLATFORM_WHEELS = {"optree", "h5py", "pillow"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

RUN_SH = """#!/bin/sh
# ./run.sh CONFIG RUN_DIR [training options]: train CONFIG under JAX into RUN_DIR (see MANIFEST.json).
# Then copy RUN_DIR back and, where TensorFlow is: make export RUN=<that copy>.
# ./run.sh study OUT [training.study options]: the study's runs; ./run.sh reference OUT AIRBENCH94_PY:
# the reference recipe on these images; ./run.sh unpack: install and decode only. ./session.sh: all.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { echo "usage: ./run.sh CONFIG RUN_DIR [training options]" >&2; exit 2; }
python=${PYTHON:-python3}
work=${BUNDLE_WORK:-$here/work}
export PYTHONPATH="$work/site:$here/code" KERAS_BACKEND=jax MPLBACKEND=Agg
# Several runs can share one GPU: JAX takes memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
PYTHONPATH="$here/code" "$python" -m training.bundle unpack "$here" --work "$work"
[ "$1" != unpack ] || exit 0
[ $# -ge 2 ] || { echo "usage: ./run.sh CONFIG RUN_DIR [training options]" >&2; exit 2; }
command=$1; out=$2; shift 2
case $command in
    study) exec "$python" -m training.study --data "$work/cifar10" --out "$out" "$@" ;;
    reference) exec "$python" -m training.reference "$@" --data "$work/cifar10" --out "$out" ;;
    *) exec "$python" -m training.train --config "$command" --data "$work/cifar10" --run-dir "$out" "$@" ;;
esac
"""

def digest(train, test):
    """sha256 of the decoded pixels and labels, train then test: what 'identical data' means."""
    h = hashlib.sha256()
    for split in (train, test):
        h.update(np.ascontiguousarray(split.images).tobytes())
        h.update(np.asarray(split.labels, np.int64).tobytes())
    return h.hexdigest()


def jpeg_names(data_dir):
    """The zip entry of every image of data/, in data/'s order (train batches 1-5, then test)."""
    names = []
    for batch in (*TRAIN_BATCHES, TEST_BATCH):
        raw = (Path(data_dir) / BATCH_DIR / batch).read_bytes()
        content = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        filenames = content.get(b"filenames") or content.get("filenames")
        if filenames is None:
            raise ValueError(f"{data_dir}: no file names in {batch}; a bundle needs data made from the JPEG copy")
        # prepare.py names train/airplane/0000.jpg train_airplane_0000.jpg; class names have no '_'.
        names += ["/".join((f.decode() if isinstance(f, bytes) else f).split("_", 2)) for f in filenames]
    return names


def pack_images(data_dir, jpeg_zip, preset):
    """The JPEG files of data/'s images, in data/'s order: (their common first bytes, stored once
    (the headers: quantization and Huffman tables, 32x32), the rest of every file concatenated
    and xz-compressed, each rest's length)."""
    import os
    import zipfile
    names = jpeg_names(data_dir)
    with zipfile.ZipFile(jpeg_zip) as archive:
        files = [archive.read(name) for name in names]
    prefix = os.path.commonprefix(files)
    lengths = np.array([len(f) - len(prefix) for f in files], np.uint32)
    return prefix, lzma.compress(b"".join(f[len(prefix):] for f in files), preset=preset), lengths


def download_wheels(dest, python_versions):
    """pip download --no-deps of the versions installed here, for each target Python."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in [*ALWAYS, *IF_MISSING]:
        pin = f"{name}=={importlib.metadata.version(name)}"
        targets = python_versions if name in PLATFORM_WHEELS else python_versions[:1]
        for version in targets:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                       "--dest", str(dest), "--python-version", version]
            if name in PLATFORM_WHEELS:
                command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
            subprocess.run([*command, pin], check=True)


def build(out, data_dir, jpeg_zip, python_versions, preset):
    out = Path(out)
    if out.exists():
        if not (out / "MANIFEST.json").is_file():
            raise ValueError(f"{out} exists and is not a bundle: choose another --out")
        shutil.rmtree(out)
    (out / "code" / "training").mkdir(parents=True)
    for source in sorted((REPO / "training").glob("*.py")):
        shutil.copy2(source, out / "code" / "training" / source.name)
    download_wheels(out / "wheels", python_versions)

    train, test = load_cifar10(data_dir)
    prefix, packed, lengths = pack_images(data_dir, jpeg_zip, preset)
    (out / "data").mkdir()
    (out / "data" / "cifar10-jpeg.xz").write_bytes(packed)
    (out / "data" / "jpeg-prefix.bin").write_bytes(prefix)
    np.savez(out / "data" / "index.npz", lengths=lengths,
             labels=np.concatenate([train.labels, test.labels]).astype(np.uint8), n_train=len(train.labels))
    label = Path(data_dir) / "DATASET.txt"
    (out / "data" / "DATASET.txt").write_text(label.read_text() if label.is_file() else "CIFAR-10\n")
    (out / "run.sh").write_text(RUN_SH)
    shutil.copy2(REPO / "training" / "gpu_session.sh", out / "session.sh")
    for script in ("run.sh", "session.sh"):
        (out / script).chmod(0o755)
    sizes = {part: sum(f.stat().st_size for f in (out / part).rglob("*") if f.is_file())
             for part in ("code", "wheels", "data")}
    manifest = {"pixels_sha256": digest(train, test), "images": {"train": len(train.labels), "test": len(test.labels)},
                "xz_preset": preset, "python_versions": list(python_versions),
                "wheels": sorted(f.name for f in (out / "wheels").iterdir()), "bytes": sizes,
                "usage": "./run.sh CONFIG RUN_DIR [training options]; then, with TensorFlow: make export RUN=RUN_DIR"}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if total > LIMIT_BYTES:
        raise ValueError(f"{out}: {total / 1e6:.1f} MB, over the {LIMIT_BYTES / 1e6:.0f} MB a bundle may take")
    return total, sizes


def write_batches(directory, train_images, train_labels, test_images, test_labels):
    """The official python-version layout, as load_cifar10 reads it (plain dicts of arrays)."""
    directory.mkdir(parents=True, exist_ok=True)

    def dump(name, images, labels):
        flat = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
        (directory / name).write_bytes(pickle.dumps({"data": flat, "labels": [int(v) for v in labels]}, protocol=2))
    per_batch = len(train_images) // len(TRAIN_BATCHES)
    for i, name in enumerate(TRAIN_BATCHES):
        end = (i + 1) * per_batch if i < len(TRAIN_BATCHES) - 1 else len(train_images)
        dump(name, train_images[i * per_batch:end], train_labels[i * per_batch:end])
    dump(TEST_BATCH, test_images, test_labels)
    (directory / "batches.meta").write_bytes(pickle.dumps({"num_cases_per_batch": per_batch}, protocol=2))


def unpack(bundle, work):
    """On the GPU machine: install the wheels this Python lacks into work/site, and decode the
    images into work/cifar10 once, checked against the bundle's pixel digest."""
    bundle, work = Path(bundle), Path(work)
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    site = work / "site"
    if not (site / ".installed").is_file():
        wanted = [*ALWAYS] + [name for name, module in IF_MISSING.items() if importlib.util.find_spec(module) is None]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--find-links", str(bundle / "wheels"), "--target", str(site), *wanted], check=True)
        (site / ".installed").write_text("\n".join(wanted) + "\n")
    data = work / "cifar10"
    if (data / "DIGEST").is_file() and (data / "DIGEST").read_text() == manifest["pixels_sha256"]:
        return data
    sys.path.insert(0, str(site))  # Pillow may have come with the bundle
    from PIL import Image
    index = np.load(bundle / "data" / "index.npz")
    raw = lzma.decompress((bundle / "data" / "cifar10-jpeg.xz").read_bytes())
    prefix = (bundle / "data" / "jpeg-prefix.bin").read_bytes()
    ends = np.cumsum(index["lengths"].astype(np.int64))
    images = np.empty((len(ends), 32, 32, 3), np.uint8)
    for i, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
        with Image.open(io.BytesIO(prefix + raw[start:end])) as image:
            images[i] = np.asarray(image.convert("RGB"))
    labels, n_train = index["labels"].astype(np.int64), int(index["n_train"])
    write_batches(data / BATCH_DIR, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])
    shutil.copy2(bundle / "data" / "DATASET.txt", data / "DATASET.txt")
    train, test = load_cifar10(data)
    found = digest(train, test)
    if found != manifest["pixels_sha256"]:
        raise SystemExit(f"error: the decoded images differ from the bundle's (sha256 {found}, expected "
                         f"{manifest['pixels_sha256']}): this Pillow's JPEG decoder gives other pixels")
    (data / "DIGEST").write_text(found)
    print(f"{data}: {len(train.labels)} train and {len(test.labels)} test images, identical to the bundle's source")
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the bundle folder")
    make.add_argument("--out", default="dist/gpu-bundle")
    make.add_argument("--data", default="data", help="the data the runs will be exported against")
    make.add_argument("--jpeg-zip", default=str(DEFAULT_JPEG_ZIP), help="the JPEG files data/ was made from")
    make.add_argument("--python", nargs="+", default=["3.12", "3.13"],
                      help="Python versions of the GPU machine, platform wheels for each (default: JAX 0.11 and "
                           "later need 3.12+; each version adds about 12 MB)")
    make.add_argument("--xz-preset", type=int, default=9 | lzma.PRESET_EXTREME, help="lzma preset (default 9e)")
    unpacking = commands.add_parser("unpack", help="on the GPU machine (run.sh does it)")
    unpacking.add_argument("bundle")
    unpacking.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        unpack(args.bundle, args.work)
        return
    try:
        total, sizes = build(args.out, args.data, args.jpeg_zip, args.python, args.xz_preset)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.out}: {total / 1e6:.1f} MB ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items())}); "
          f"on the GPU machine: ./run.sh CONFIG RUN_DIR, then here: make export RUN=RUN_DIR")


if __name__ == "__main__":
    main()
