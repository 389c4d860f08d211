"""A portable GPU run: one folder that trains a configuration under JAX on a machine with JAX and
no network, and whose run directory comes back for `make export`.

    make gpu-bundle                  # = python -m training.lab.bundle build: dist/gpu-bundle + dist/gpu-data/
    # carry both to the GPU machine (the plan it prints says how, in calls under the carry limit), there:
    ./run.sh default /somewhere/runs/default [--epochs 5 ...]   # any training.train option
    # copy /somewhere/runs/default back, then here:
    make export RUN=runs/default

The folder holds the training code (code/training), the wheels a GPU machine's JAX installation
lacks (wheels/: keras, optree and namex; the rest of what Keras imports, numpy, absl-py, rich,
h5py, Pillow, comes with such a machine, and run.sh names what is missing), run.sh, session.sh,
MANIFEST.json and the images' index. CIFAR-10 travels beside it, in dist/gpu-data/: data/'s
60,000 images as PNG files (lossless: the very pixels) with their common first bytes stored once,
concatenated and cut into parts of at most --part-mb, so that each call to the GPU machine carries
one part on top of the working tree within the 64 MiB a call may carry; the machine keeps what
earlier calls carried, and the last call brings the bundle folder and runs. On the GPU machine,
run.sh checks that every part has arrived (sha256 of each, naming the missing ones), installs the
wheels into work/site (pip, no index), decodes the images once into work/cifar10 (the official
batch layout) and checks that they are the very pixels of data/ (a sha256 of the decoded
arrays), then runs `python -m training.train` under KERAS_BACKEND=jax. The run directory gets
metrics.csv, state.json, history.png (where matplotlib is installed; `make export` draws it
otherwise), checkpoints and weights.float16.npz, the trained network that export needs.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from training.recipe.data import BATCH_DIR, TEST_BATCH, TRAIN_BATCHES, load_cifar10

REPO = Path(__file__).resolve().parents[2]
CARRY_LIMIT = 64 * 2**20  # what one call to the GPU machine carries, the working tree included
MARGIN = 2 * 2**20        # for what the working tree gains between building and carrying
# Distribution -> the module it provides: the wheels the bundle carries (tested with these versions).
WHEELS = {"keras": "keras", "optree": "optree", "namex": "namex"}
# What Keras and the training code import beyond them, which a GPU machine with JAX has.
EXPECTED = {"numpy": "numpy", "absl-py": "absl", "rich": "rich", "h5py": "h5py", "packaging": "packaging",
            "ml_dtypes": "ml_dtypes", "pillow": "PIL"}
PLATFORM_WHEELS = {"optree"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

RUN_SH = """#!/bin/sh
# ./run.sh CONFIG RUN_DIR [training options]: train CONFIG under JAX into RUN_DIR (see MANIFEST.json).
# Then copy RUN_DIR back and, where TensorFlow is: make export RUN=<that copy>.
# ./run.sh study OUT [training.lab.study options]: the study's runs; ./run.sh reference OUT AIRBENCH94_PY:
# the reference recipe on these images; ./run.sh unpack: install and decode only. ./session.sh: all.
# The images' parts are read from BUNDLE_DATA (default: gpu-data beside this folder).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { echo "usage: ./run.sh CONFIG RUN_DIR [training options]" >&2; exit 2; }
python=${PYTHON:-python3}
work=${BUNDLE_WORK:-$here/work}
export PYTHONPATH="$work/site:$here/code" KERAS_BACKEND=jax MPLBACKEND=Agg
# Several runs can share one GPU: JAX takes memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
PYTHONPATH="$here/code" "$python" -m training.lab.bundle unpack "$here" --data "${BUNDLE_DATA:-$here/../gpu-data}" \\
    --work "$work"
[ "$1" != unpack ] || exit 0
[ $# -ge 2 ] || { echo "usage: ./run.sh CONFIG RUN_DIR [training options]" >&2; exit 2; }
command=$1; out=$2; shift 2
case $command in
    study) exec "$python" -m training.lab.study --data "$work/cifar10" --out "$out" "$@" ;;
    reference) exec "$python" -m training.lab.reference "$@" --data "$work/cifar10" --out "$out" ;;
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_images(images):
    """Every image as a PNG file (lossless), in order: (their common first bytes, stored once (the
    signature and the 32x32 header), the rest of every file concatenated, each rest's length)."""
    from PIL import Image
    files = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        files.append(buffer.getvalue())
    prefix = os.path.commonprefix(files)
    lengths = np.array([len(f) - len(prefix) for f in files], np.uint32)
    return prefix, b"".join(f[len(prefix):] for f in files), lengths


def working_tree_bytes(repo=REPO):
    """What a call to the GPU machine carries of the checkout before any carried path: tracked files
    and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def carry_plan(bundle_bytes, part_sizes, tree_bytes):
    """The calls that bring the bundle and its parts to the GPU machine, each within CARRY_LIMIT:
    a list of (number of parts, with the bundle folder) per call, the bundle in the last."""
    budget = CARRY_LIMIT - MARGIN - tree_bytes
    calls, load, count = [], 0, 0
    for size in part_sizes:
        if size > budget:
            raise ValueError(f"a part of {size / 2**20:.1f} MiB does not fit beside the {tree_bytes / 2**20:.1f} MiB "
                             f"working tree in one call: build with a smaller --part-mb")
        if load + size > budget or count == 8:  # a call names at most 8 carried paths
            calls.append(count)
            load, count = 0, 0
        load, count = load + size, count + 1
    if load + bundle_bytes > budget or count == 8:
        calls.append(count)
        count = 0
    return [(n, False) for n in calls] + [(count, True)]


def download_wheels(dest, python_versions):
    """pip download --no-deps of the versions installed here, for each target Python."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        pin = f"{name}=={importlib.metadata.version(name)}"
        targets = python_versions if name in PLATFORM_WHEELS else python_versions[:1]
        for version in targets:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                       "--dest", str(dest), "--python-version", version]
            if name in PLATFORM_WHEELS:
                command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
            subprocess.run([*command, pin], check=True)


def build(out, data_out, data_dir, python_versions, part_mb=None, tree_bytes=None):
    """The bundle folder `out` and the images' parts in `data_out`; returns the manifest. Parts are
    --part-mb MB, or as large as one call carries beside the working tree."""
    out, data_out = Path(out), Path(data_out)
    for folder, marker in ((out, "MANIFEST.json"), (data_out, "PARTS.json")):
        if folder.exists():
            if not (folder / marker).is_file():
                raise ValueError(f"{folder} exists and is not a bundle's: choose another folder")
            shutil.rmtree(folder)
    for source in sorted((REPO / "training").rglob("*.py")):  # the package's code, its tests left out
        relative = source.relative_to(REPO)
        if "tests" not in relative.parts:
            (out / "code" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out / "code" / relative)
    download_wheels(out / "wheels", python_versions)
    (out / "run.sh").write_text(RUN_SH)
    shutil.copy2(REPO / "training" / "lab" / "gpu_session.sh", out / "session.sh")
    for script in ("run.sh", "session.sh"):
        (out / script).chmod(0o755)

    train, test = load_cifar10(data_dir)
    prefix, packed, lengths = pack_images(np.concatenate([train.images, test.images]))
    np.savez(out / "index.npz", lengths=lengths, prefix=np.frombuffer(prefix, np.uint8),
             labels=np.concatenate([train.labels, test.labels]).astype(np.uint8), n_train=len(train.labels))
    label = Path(data_dir) / "DATASET.txt"
    (out / "DATASET.txt").write_text(label.read_text() if label.is_file() else "CIFAR-10\n")
    bundle_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) + 4096  # + the manifest
    tree_bytes = working_tree_bytes() if tree_bytes is None else tree_bytes
    part_bytes = int(part_mb * 10**6) if part_mb else CARRY_LIMIT - MARGIN - tree_bytes - bundle_bytes
    if part_bytes <= 0:
        raise ValueError(f"the working tree ({tree_bytes / 2**20:.1f} MiB) leaves no room under the "
                         f"{CARRY_LIMIT / 2**20:.0f} MiB a call carries")
    data_out.mkdir(parents=True)
    parts = []
    for i, start in enumerate(range(0, len(packed), part_bytes)):
        chunk = packed[start:start + part_bytes]
        (data_out / f"part{i:02d}").write_bytes(chunk)
        parts.append({"name": f"part{i:02d}", "bytes": len(chunk), "sha256": sha256(chunk)})
    (data_out / "PARTS.json").write_text(json.dumps(parts, indent=2))
    plan = carry_plan(bundle_bytes, [p["bytes"] for p in parts], tree_bytes)
    manifest = {"pixels_sha256": digest(train, test), "images": {"train": len(train.labels), "test": len(test.labels)},
                "format": "PNG", "parts": parts, "python_versions": list(python_versions),
                "wheels": sorted(f.name for f in (out / "wheels").iterdir()), "bundle_bytes": bundle_bytes,
                "tree_bytes": tree_bytes, "calls": [{"parts": n, "bundle": b} for n, b in plan],
                "usage": "./run.sh CONFIG RUN_DIR [training options]; then, with TensorFlow: make export RUN=RUN_DIR"}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def describe_plan(manifest, out, data_out):
    """The carry lists of the calls, one line each."""
    names = iter(p["name"] for p in manifest["parts"])
    lines = []
    for i, call in enumerate(manifest["calls"], 1):
        carried = [f"{data_out}/{next(names)}" for _ in range(call["parts"])] + ([str(out)] if call["bundle"] else [])
        lines.append(f"  call {i}: carry {json.dumps(carried)}" + (f"; then {out}/session.sh ..." if call["bundle"] else ""))
    return "\n".join(lines)


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


def joined_parts(manifest, data):
    """The parts in `data`, checked and joined; refuses, naming them, parts missing or damaged."""
    problems, chunks = [], []
    for part in manifest["parts"]:
        path = Path(data) / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']} is missing")
            continue
        chunk = path.read_bytes()
        if sha256(chunk) != part["sha256"]:
            problems.append(f"{part['name']} is damaged ({len(chunk)} of {part['bytes']} bytes)")
        chunks.append(chunk)
    if problems:
        raise SystemExit(f"error: the images' parts in {data} are not all here: {'; '.join(problems)}; "
                         "carry them as make gpu-bundle's plan says")
    return b"".join(chunks)


def unpack(bundle, data, work):
    """On the GPU machine: install the wheels into work/site, and decode the images from the parts
    in `data` into work/cifar10 once, checked against the bundle's pixel digest."""
    bundle, work = Path(bundle), Path(work)
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    missing = [name for name, module in EXPECTED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"error: this Python lacks {', '.join(missing)}, which a GPU machine with JAX has; "
                         "install them (pip install --no-index from wheels carried along)")
    site = work / "site"
    if not (site / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--find-links", str(bundle / "wheels"), "--target", str(site), *WHEELS], check=True)
        (site / ".installed").write_text("\n".join(WHEELS) + "\n")
    target = work / "cifar10"
    if (target / "DIGEST").is_file() and (target / "DIGEST").read_text() == manifest["pixels_sha256"]:
        return target
    from PIL import Image
    raw = joined_parts(manifest, data)
    with np.load(bundle / "index.npz") as index:
        prefix, lengths = index["prefix"].tobytes(), index["lengths"].astype(np.int64)
        labels, n_train = index["labels"].astype(np.int64), int(index["n_train"])
    ends = np.cumsum(lengths)
    images = np.empty((len(ends), 32, 32, 3), np.uint8)
    for i, (start, end) in enumerate(zip(ends - lengths, ends)):
        with Image.open(io.BytesIO(prefix + raw[start:end])) as image:
            images[i] = np.asarray(image.convert("RGB"))
    write_batches(target / BATCH_DIR, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])
    shutil.copy2(bundle / "DATASET.txt", target / "DATASET.txt")
    train, test = load_cifar10(target)
    found = digest(train, test)
    if found != manifest["pixels_sha256"]:
        raise SystemExit(f"error: the decoded images differ from the bundle's (sha256 {found}, expected "
                         f"{manifest['pixels_sha256']})")
    (target / "DIGEST").write_text(found)
    print(f"{target}: {len(train.labels)} train and {len(test.labels)} test images, identical to the bundle's source")
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the bundle folder and the images' parts")
    make.add_argument("--out", default="dist/gpu-bundle")
    make.add_argument("--data-out", default="dist/gpu-data", help="the images' parts (run.sh reads them beside --out)")
    make.add_argument("--data", default="data", help="the data the runs will be exported against")
    make.add_argument("--python", nargs="+", default=["3.12"],
                      help="Python versions of the GPU machine, optree's platform wheel for each (default: the "
                           "GPU machines' 3.12)")
    make.add_argument("--part-mb", type=float, help="size of each part (default: what one call carries beside "
                      "the working tree)")
    unpacking = commands.add_parser("unpack", help="on the GPU machine (run.sh does it)")
    unpacking.add_argument("bundle")
    unpacking.add_argument("--data", required=True, help="the folder of the images' parts")
    unpacking.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        unpack(args.bundle, args.data, args.work)
        return
    try:
        manifest = build(args.out, args.data_out, args.data, args.python, args.part_mb)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    parts = manifest["parts"]
    print(f"{args.out}: {manifest['bundle_bytes'] / 2**20:.1f} MiB (code, wheels, index); {args.data_out}: "
          f"{len(parts)} parts, {sum(p['bytes'] for p in parts) / 2**20:.1f} MiB of PNG images. Beside the "
          f"{manifest['tree_bytes'] / 2**20:.1f} MiB working tree, {len(manifest['calls'])} calls bring them "
          f"(the machine keeps what earlier calls carried):\n{describe_plan(manifest, args.out, args.data_out)}\n"
          f"on the GPU machine: {args.out}/run.sh CONFIG RUN_DIR, then here: make export RUN=RUN_DIR")


if __name__ == "__main__":
    main()
