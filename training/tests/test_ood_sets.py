"""Set E of training.lab.ood_sets: Tiny ImageNet split into the ten classes and none of them by the
check set's wnid mapping, read from a real git repository, with copies of check photos left out."""

import csv
import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from training.lab import ood_sets

CHIHUAHUA, GOLDFISH, TRACTOR = "n02085620", "n01443537", "n04465501"  # dog, none of the ten, a look-alike


def jpeg(seed):
    """A 64x64 photo-like (smooth) random image."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((64, 64), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def tiny_imagenet(tmp_path, monkeypatch):
    """A mirror holding a three-class Tiny ImageNet; returns (its train files, the check folder)."""
    repo = tmp_path / "mirror" / "owner+tiny" / "repo"
    files = {}
    for c, wnid in enumerate((CHIHUAHUA, GOLDFISH, TRACTOR)):
        for k in range(3):
            files[f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{k}.JPEG"] = jpeg(10 * c + k)
        files[f"tiny-imagenet-200/train/{wnid}/{wnid}_boxes.txt"] = b"not an image\n"
        files[f"tiny-imagenet-200/val/images/val_{c}.JPEG"] = jpeg(100 + c)
    files["tiny-imagenet-200/val/val_annotations.txt"] = "".join(
        f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63\n" for c, wnid in enumerate((CHIHUAHUA, GOLDFISH, TRACTOR))).encode()
    for path, data in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(data)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "tiny"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(ood_sets, "MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setattr(ood_sets, "TINY_IMAGENET", ("owner+tiny", commit, "tiny-imagenet-200/"))
    monkeypatch.setattr(ood_sets, "TINY_OUT_PER_CLASS", {"train": 2, "val": 1})
    check = tmp_path / "ood-check"
    (check / "out").mkdir(parents=True)
    # A check photo that is one of the goldfish photos the spread would take, re-encoded.
    Image.open(io.BytesIO(files[f"tiny-imagenet-200/train/{GOLDFISH}/images/{GOLDFISH}_0.JPEG"])).save(
        check / "out" / f"{GOLDFISH}_goldfish.JPEG", quality=75)
    (check / "out" / f"{TRACTOR}_tractor.JPEG").write_bytes(jpeg(999))
    return files, check


def test_tiny_imagenet_is_split_by_the_check_sets_mapping_and_drops_copies_of_check_photos(tiny_imagenet, tmp_path):
    files, check = tiny_imagenet
    out = tmp_path / "tiny"
    manifest, copies = ood_sets.build_tiny_imagenet(str(out), str(check))

    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.JPEG"))
    assert written == [f"train/in/dog/{CHIHUAHUA}_{k}.JPEG" for k in range(3)] + [
        f"train/out/{GOLDFISH}/{GOLDFISH}_1.JPEG",  # _0 is a check photo's copy; the spread of 2 took _0 and _1
        "val/in/dog/val_0.JPEG", f"val/out/{GOLDFISH}/val_1.JPEG"]
    assert copies == 1
    for name in written:  # the original bytes
        source = next(row[1] for row in manifest if row[0] == name)
        assert (out / name).read_bytes() == files[source]
    with open(out / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rows) == written
    assert all(float(r["closest_check_correlation"]) <= ood_sets.COPY_CORRELATION for r in rows)


def test_git_read_many_returns_every_blob_in_order_binary_included(tiny_imagenet):
    files, _ = tiny_imagenet
    repo, commit, _ = ood_sets.TINY_IMAGENET
    paths = sorted(files, reverse=True)
    assert ood_sets.git_read_many(repo, commit, paths) == [files[p] for p in paths]
