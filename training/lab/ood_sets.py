"""Rebuild the image sets the out-of-distribution head is trained, chosen and checked on, from local mirrors.

Set A, "choosing" set (OOD validation):  data/ood-val/<source>/...
Set B, "checking" set (ImageNet samples): data/ood-check/{in/<cifar_class>,out}/...
                                          + data/ood-check/mapping.csv
Set C, training outliers (outlier exposure): data/outliers/<source>/<class>/...
                                          + data/outliers/manifest.csv
Set D, in-class web photos:               data/web-in/{train,val}/<cifar_class>/...
                                          + data/web-in/manifest.csv
Set E, Tiny ImageNet photos:              data/tiny-imagenet/{train,val}/{in/<cifar_class>,out/<wnid>}/...
                                          + data/tiny-imagenet/manifest.csv

C and D come from the same two web sources; train/ of D is trained on beside C, val/ of D is chosen
on beside A. C and D share no source with A or B, and neither source is ImageNet (natural_images
compiles other public sets, unchecked here; no check photo has a copy in C or D: SOURCE-outliers.md).
E is ImageNet (downsampled training images of 200 of its classes), split into the ten and none of
them by the same wnid mapping as B; any photo with a near copy among B's is left out
(SOURCE-tiny-imagenet.md), so B still checks on photos never trained on, though no longer from a
source training never saw.

Inputs are read only from bare git mirrors under MIRROR (made with the
search tool's `fetch`) at the pinned commits below, and from the data files
that ship inside the scikit-image and scikit-learn wheels (SITE_PACKAGES;
the packages are not imported). numpy + Pillow + standard library only.

    python -m training.lab.ood_sets [--out data]    # then: python -m training.ship.ood RUN_DIR --set NAME=FOLDER ...
"""
import argparse
import csv
import gzip
import io
import os
import subprocess

import numpy as np
from PIL import Image

MIRROR = os.environ.get("OOD_MIRROR", "/work/.mirror")
SITE_PACKAGES = os.environ.get(
    "OOD_SITE_PACKAGES", "/tmp/oodvenv/lib/python3.11/site-packages")
PACKAGES = {"scikit-image": "0.26.0", "scikit-learn": "1.9.1"}
MAX_BYTES = 5 * 1024 * 1024

# ---- Set A: git sources ---------------------------------------------------
# name: (mirror dir, commit, path prefix, {class folder: n to take or None=all})
GIT_SOURCES = {
    "dtd_textures": ("pan8915+DeepTexture",
                     "522f46f683af11e93673bff29f81df14f49edfb2", "images/",
                     {c: 40 for c in ("banded", "blotchy", "braided", "bubbly",
                                      "bumpy", "chequered", "cobwebbed",
                                      "cracked", "crosshatched", "crystalline")}),
    "hymenoptera_insects": ("zhangtao7750+syn",
                            "f0503091488f67b6809a6da2eaa43c25f2f277fc",
                            "hymenoptera_data/",
                            {"train/ants": None, "train/bees": None,
                             "val/ants": None, "val/bees": None}),
    "intel_scenes": ("afroozsheikh+Intel-Image-Classifier",
                     "268f8fc38fb3f7307c1861d619ee99ff4158a3f5", "test/",
                     {"forest": 134, "glacier": 133, "mountain": 133}),
    "fruit_photos": ("narumiruna+fruit-images-for-object-detection",
                     "59da6a75e1ba11c141c34c4c1df7e9e09f484011", "data/bbox/",
                     {"train": None, "test": None}),
    # PGM files: converted to PNG (RGB)
    "orl_faces": ("hakawa-bernardi+orl-face-recognition-pca-svm",
                  "3edc842bc89bddbd3d6bcf12d23a4f9c2a493883", "orl_faces/",
                  {"s%d" % i: None for i in range(1, 41)}),
}
# Picked files left out after a look: a mountain goat, a dock with boats.
VAL_EXCLUDED_PATHS = {"test/glacier/22011.jpg", "test/glacier/21840.jpg"}
# COIL-100 (128x128 PNG): objects that are toy cars/trucks/boats/a tank or
# cat/dog/frog/duck figurines are left out (checked by eye on a contact sheet).
COIL = ("muratkirtay+ESANN2018", "fb74c33a95f0c96e9afc9b74551475b3d5f25031",
        "COIL100/")
COIL_EXCLUDED = {3, 6, 8, 14, 15, 17, 19, 23, 27, 28, 37, 38, 42, 52, 69, 74,
                 76, 78, 91, 100}
COIL_VIEWS = 5            # evenly spaced turntable views per object
# ---- Set A: package sources -----------------------------------------------
SKIMAGE_FILES = ("astronaut.png", "brick.png", "camera.png", "cell.png",
                 "clock_motion.png", "coffee.png", "coins.png", "grass.png",
                 "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                 "page.png", "retina.jpg", "rocket.jpg", "text.png")
SKIMAGE_LFW_FACES = 100   # lfw_subset.npy: first 100 of 200 are faces (25x25)
SKLEARN_DIGITS = 400      # digits.csv.gz: 1797 8x8 handwritten digits
SKLEARN_IMAGES = ("china.jpg", "flower.jpg")

# ---- Set B: ImageNet one-image-per-class sample ----------------------------
IMAGENET = ("EliSchwartz+imagenet-sample-images",
            "bc69043e2862758a1906c6a24a792bb28c6bb2ff")
BIRD_RANGES = (("n01514668", "n01622779"), ("n01795545", "n01860187"),
               ("n02002556", "n02058221"))          # cock..owl, grouse..swan, stork..albatross
DOG_RANGE = ("n02085620", "n02113978")
IN_WNIDS = {
    "airplane": ("n02690373", "n04552348"),             # airliner, warplane
    "automobile": ("n04285008", "n03100240", "n02930766", "n03670208",
                   "n03770679", "n04037443", "n02814533", "n03777568",
                   "n03594945"),  # sports car convertible cab limo minivan racer
    #                               beach wagon, Model T, jeep
    "cat": ("n02123045", "n02123159", "n02123394", "n02123597", "n02124075"),
    "frog": ("n01641577", "n01644373", "n01644900"),
    "horse": ("n02389026",),                             # sorrel
    "ship": ("n03095699", "n03673027", "n02687172", "n03947888", "n04147183",
             "n03344393", "n04273569", "n03662601", "n04612504", "n02981792",
             "n04483307"),  # container ship, liner, carrier, pirate, schooner,
    #                         fireboat, speedboat, lifeboat, yawl, cata/trimaran
    "truck": ("n03345487", "n03417042", "n04467665", "n03796401"),
}  # fire engine, garbage truck, trailer truck, moving van. No deer class exists.
# Not one of the ten, but too close (look-alikes, parts, or the sample image
# shows one of the ten classes): neither "in" nor "out".
EXCLUDED_WNIDS = {
    # wolves, foxes, hyena etc.
    "n02114367", "n02114548", "n02114712", "n02114855", "n02115641",
    "n02115913", "n02116738", "n02117135", "n02119022", "n02119789",
    "n02120079", "n02120505",
    # big cats
    "n02125311", "n02127052", "n02128385", "n02128757", "n02128925",
    "n02129165", "n02129604", "n02130308",
    # zebra, antelopes, wild goats/sheep
    "n02391049", "n02422106", "n02422699", "n02423022", "n02417914",
    "n02415577",
    # car-, truck-, plane- and boat-like or parts (pickup: CIFAR's own class
    # notes say neither automobile nor truck includes pickups; the tow truck
    # sample shows mostly a sedan)
    "n04461696", "n03930630", "n03977966", "n02701002", "n03769881", "n04065272",
    "n03776460", "n04252225", "n03478589", "n03384352", "n04465501",
    "n03444034", "n03445924", "n02974003", "n03459775", "n02965783",
    "n03208938", "n04162706", "n03841143", "n03425413", "n04592741",
    "n02692877", "n04266014", "n03773504", "n04008634", "n04347754",
    "n04606251", "n02951358", "n03447447", "n03874293", "n02704792",
    "n03216828", "n02859443", "n03240683", "n03873416",
    # the class name implies a dog/horse/bird: dogsled, horse cart, muzzle,
    # birdhouse
    "n03218198", "n03538406", "n03803284", "n02843684",
    # the sample image itself shows one of the ten (checked by eye): water
    # snake (duck), hare (magpies), bow (deer), bassoon (cars), carousel (toy
    # cars), diaper (car print), lawn mower (tractors, truck), lumbermill
    # (horses), motor scooter (car, fire engine), parking meter (donkeys),
    # shopping cart (car), shower curtain (cat), ski (car), soccer ball (dog),
    # solar dish (pickup), tennis ball (dog), triumphal arch (cars), ear (dog)
    "n01737021", "n02326432", "n02879718", "n02804610", "n02966193",
    "n03188531", "n03649909", "n03697007", "n03791053", "n03891332",
    "n04204347", "n04209239", "n04228054", "n04254680", "n04258138",
    "n04409515", "n04486054", "n13133613",
}
EXCLUDED_WNIDS |= set(os.environ.get("OOD_EXTRA_EXCLUDED", "").split()) - {""}


def git_dir(name):
    d = os.path.join(MIRROR, name, "repo")
    return os.path.join(d, ".git") if os.path.isdir(os.path.join(d, ".git")) else d


def git_ls(repo, commit, prefix):
    cmd = ["git", "-C", git_dir(repo), "ls-tree", "-r", "-l", commit]
    out = subprocess.run(cmd + ([prefix] if prefix else []), check=True,
                         capture_output=True, text=True).stdout
    rows = [line.split(None, 4) for line in out.splitlines()]
    return sorted((r[4], int(r[3])) for r in rows if r[1] == "blob")


def git_read(repo, commit, path):
    return subprocess.run(["git", "-C", git_dir(repo), "show",
                           "%s:%s" % (commit, path)], check=True,
                          capture_output=True).stdout


def spread(items, n):
    """n items evenly spaced over the sorted list (all if n is None)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def save_array(arr, path, min_side=32):
    im = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    k = max(1, -(-min_side // min(im.size)))           # ceil
    im.resize((im.width * k, im.height * k), Image.NEAREST).save(path)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def build_val(out):
    manifest = []

    def add(source, name, origin, data=None, array=None):
        path = os.path.join(out, source, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if array is not None:
            save_array(array, path)
        else:
            write(path, data)
        manifest.append((os.path.relpath(path, out), source, origin))

    for source, (repo, commit, prefix, classes) in GIT_SOURCES.items():
        files = git_ls(repo, commit, prefix)
        for cls, n in classes.items():
            sub = [p for p, size in files if p.startswith(prefix + cls + "/")
                   and size <= MAX_BYTES
                   and p.lower().endswith((".jpg", ".jpeg", ".png", ".pgm"))]
            for p in spread(sub, n):
                if p in VAL_EXCLUDED_PATHS:
                    continue
                tag, base = cls.replace("/", "_"), os.path.basename(p)
                name = base if base.startswith(tag) else tag + "_" + base
                data = git_read(repo, commit, p)
                if data[:4] == b"\x89PNG" and not name.endswith(".png"):
                    name = os.path.splitext(name)[0] + ".png"  # PNG named .jpg
                if p.lower().endswith(".pgm"):
                    add(source, name[:-4] + ".png", p,
                        array=np.asarray(Image.open(io.BytesIO(data))))
                else:
                    add(source, name, p, data)
    repo, commit, prefix = COIL
    views = {}  # obj -> sorted [(angle, path)]  (a few views are missing)
    for p, _ in git_ls(repo, commit, prefix):
        if not p.endswith(".png"):
            continue
        obj, angle = os.path.basename(p)[3:-4].split("__")
        views.setdefault(int(obj), []).append((int(angle), p))
    for obj in sorted(set(views) - COIL_EXCLUDED):
        for _, p in spread(sorted(views[obj]), COIL_VIEWS):
            add("coil100_objects", os.path.basename(p), p,
                git_read(repo, commit, p))
    sk = os.path.join(SITE_PACKAGES, "skimage", "data")
    for f in SKIMAGE_FILES:
        with open(os.path.join(sk, f), "rb") as fh:
            add("skimage_data", f, "skimage/data/" + f, fh.read())
    faces = np.load(os.path.join(sk, "lfw_subset.npy"))[:SKIMAGE_LFW_FACES]
    for i, face in enumerate(faces):
        a = face * 255 if face.max() <= 1.0 else face
        add("skimage_data", "lfw_face_%03d.png" % i,
            "skimage/data/lfw_subset.npy[%d]" % i, array=a)
    skl = os.path.join(SITE_PACKAGES, "sklearn", "datasets")
    with gzip.open(os.path.join(skl, "data", "digits.csv.gz"), "rt") as fh:
        digits = np.loadtxt(fh, delimiter=",")
    for i in spread(list(range(len(digits))), SKLEARN_DIGITS):
        img = digits[i, :64].reshape(8, 8) * (255.0 / 16.0)
        add("sklearn_digits", "digit%d_%04d.png" % (digits[i, 64], i),
            "sklearn/datasets/data/digits.csv.gz[%d]" % i, array=img)
    for f in SKLEARN_IMAGES:
        with open(os.path.join(skl, "images", f), "rb") as fh:
            add("sklearn_sample_images", f, "sklearn/datasets/images/" + f,
                fh.read())
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "source", "origin"])
        w.writerows(manifest)
    return manifest


# ---- Set C: outliers to train on (Hendrycks et al. 2019, outlier exposure) ----
# name: (mirror dir, commit, path prefix, class folders left out)
OUTLIER_SOURCES = {
    # Caltech-101 (Fei-Fei et al. 2004): 101 object categories from web searches, about 300x200.
    # Left out: the categories that are, or look at 32x32 like, one of the ten classes (planes,
    # car sides, boats, birds, a dog, cats and cartoon ones, deer-like animals) and the unsorted
    # BACKGROUND_Google, which holds anything.
    "caltech101": ("MachineLearning2020+Homework2-Caltech101",
                   "836044dd000296b2bb74d0aa4b4e462e459b01d7", "101_ObjectCategories/",
                   {"BACKGROUND_Google", "airplanes", "car_side", "ferry", "ketch", "schooner",
                    "emu", "flamingo", "flamingo_head", "ibis", "pigeon", "rooster", "dalmatian",
                    "snoopy", "garfield", "cougar_body", "cougar_face", "wild_cat", "Leopards",
                    "gerenuk", "okapi", "llama"}),
    # "natural images" (Roy et al. 2018), 30x30 copies: people, flowers, fruit, motorbikes kept.
    "natural_images": ("Keunyoung-Jung+my_first_DL",
                       "932818bf4f04654be194dc41984a8c02610ea63a", "natural_images/",
                       {"airplane", "car", "cat", "dog"}),
}


# ---- Set D: photos of the ten classes from the same web sources (labelled by folder) ----
# Outliers alone teach "a downscaled web photo is none of the ten classes": the exposed network
# flagged most in-class photos too. These photos show it web photos of the ten classes, labelled;
# every other file of each class folder is kept aside to choose on (web-in/val).
IN_CLASS_SOURCES = {
    "caltech101": {"airplanes": "airplane", "car_side": "automobile", "ferry": "ship", "ketch": "ship",
                   "schooner": "ship", "emu": "bird", "flamingo": "bird", "flamingo_head": "bird",
                   "ibis": "bird", "pigeon": "bird", "rooster": "bird", "dalmatian": "dog"},
    "natural_images": {"airplane": "airplane", "car": "automobile", "cat": "cat", "dog": "dog"},
}


def build_in_class(out):
    manifest = []
    for source, classes in IN_CLASS_SOURCES.items():
        repo, commit, prefix, _ = OUTLIER_SOURCES[source]
        for folder, cifar in classes.items():
            files = [p for p, size in git_ls(repo, commit, prefix + folder + "/")
                     if size <= MAX_BYTES and p.lower().endswith((".jpg", ".jpeg", ".png"))]
            for i, p in enumerate(files):
                half = "val" if i % 2 else "train"
                dest = os.path.join(out, half, cifar, "%s_%s_%s" % (source, folder, os.path.basename(p)))
                write(dest, git_read(repo, commit, p))
                manifest.append((os.path.relpath(dest, out), source, p))
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "source", "origin"])
        w.writerows(manifest)
    return manifest


def build_outliers(out):
    manifest = []
    for source, (repo, commit, prefix, left_out) in OUTLIER_SOURCES.items():
        for p, size in git_ls(repo, commit, prefix):
            cls = p[len(prefix):].split("/")[0]
            if cls in left_out or size > MAX_BYTES or not p.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            dest = os.path.join(out, source, cls, os.path.basename(p))
            write(dest, git_read(repo, commit, p))
            manifest.append((os.path.relpath(dest, out), source, p))
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "source", "origin"])
        w.writerows(manifest)
    return manifest


# ---- Set E: Tiny ImageNet (Le & Yang 2015): 64x64 ImageNet photos, 500 per class ----
# The check photos showed why sets C and D fall short: the in-class ImageNet photos the network
# gets wrong are what it flags (dogs: 118 of the 212, 56% of them right). E gives it labelled
# ImageNet photos of seven of the ten classes and ImageNet photos of none of them, split by the
# same wnid mapping as the check set; the look-alikes (EXCLUDED_WNIDS) are in neither.
TINY_IMAGENET = ("rangeetpan+IMagenet", "6125d8a1069df02232eb57678fd46c700411dd45", "tiny-imagenet-200/")
TINY_OUT_PER_CLASS = {"train": 100, "val": 20}  # in-class photos: all (500 and 50 a class)
COPY_CORRELATION = 0.95  # Pearson of the 32x32 pixels above which a photo counts as a copy


def git_read_many(repo, commit, paths):
    """The blobs of `paths` in order, through one `git cat-file --batch`."""
    spec = "".join("%s:%s\n" % (commit, p) for p in paths).encode()
    out = subprocess.run(["git", "-C", git_dir(repo), "cat-file", "--batch"], input=spec,
                         check=True, capture_output=True).stdout
    blobs, at = [], 0
    for _ in paths:
        header_end = out.index(b"\n", at)
        size = int(out[at:header_end].split()[2])
        blobs.append(out[header_end + 1:header_end + 1 + size])
        at = header_end + 2 + size
    return blobs


def tiny_imagenet_files(repo, commit, prefix):
    """{(half, wnid): [paths]} of the labelled images: train/<wnid>/images/, and val/images/ by
    val_annotations.txt."""
    files = {}
    for p, _ in git_ls(repo, commit, prefix + "train/"):
        parts = p[len(prefix):].split("/")
        if len(parts) == 4 and parts[2] == "images" and p.endswith(".JPEG"):
            files.setdefault(("train", parts[1]), []).append(p)
    annotations = git_read(repo, commit, prefix + "val/val_annotations.txt").decode()
    for line in annotations.splitlines():
        name, wnid = line.split("\t")[:2]
        files.setdefault(("val", wnid), []).append(prefix + "val/images/" + name)
    return files


def pixels32(data):
    """An image file as the network sees it (the worker's preprocessing), flattened, float."""
    from worker.preprocess import preprocess
    return preprocess(data, 40_000_000).reshape(-1).astype(np.float32)


def correlations_with(check_folder, candidates):
    """For each row of `candidates` ([N, 3072] pixels), its highest Pearson correlation with any
    image under `check_folder`."""
    from training.recipe.images import load_image_folder
    checks = load_image_folder(check_folder)[0].reshape(-1, 32 * 32 * 3).astype(np.float32)
    if not len(checks):
        raise SystemExit("%s holds no check photos: build it first" % check_folder)

    def standardized(x):
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    reference = standardized(checks)
    return np.concatenate([(standardized(chunk) @ reference.T).max(axis=1)
                           for chunk in np.array_split(candidates, max(1, len(candidates) // 4096))])


def build_tiny_imagenet(out, check_folder):
    repo, commit, prefix = TINY_IMAGENET
    chosen = []  # (half, kind, folder, path)
    for (half, wnid), paths in sorted(tiny_imagenet_files(repo, commit, prefix).items()):
        cls = cifar_class(wnid)
        if cls:
            chosen += [(half, "in", cls, p) for p in sorted(paths)]
        elif wnid not in EXCLUDED_WNIDS:
            chosen += [(half, "out", wnid, p) for p in spread(sorted(paths), TINY_OUT_PER_CLASS[half])]
    blobs = git_read_many(repo, commit, [c[3] for c in chosen])
    closest = correlations_with(check_folder, np.stack([pixels32(b) for b in blobs]))
    manifest, copies = [], 0
    for (half, kind, folder, p), data, r in zip(chosen, blobs, closest):
        if r > COPY_CORRELATION:
            copies += 1
            continue
        dest = os.path.join(out, half, kind, folder, os.path.basename(p))
        write(dest, data)
        manifest.append((os.path.relpath(dest, out), p, "%.3f" % r))
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "origin", "closest_check_correlation"])
        w.writerows(manifest)
    return manifest, copies


def cifar_class(wnid):
    if any(lo <= wnid <= hi for lo, hi in BIRD_RANGES):
        return "bird"
    if DOG_RANGE[0] <= wnid <= DOG_RANGE[1]:
        return "dog"
    for cls, ids in IN_WNIDS.items():
        if wnid in ids:
            return cls
    return None


def build_check(out):
    repo, commit = IMAGENET
    rows = []
    for p, size in git_ls(repo, commit, ""):
        if not p.endswith(".JPEG"):
            continue
        wnid, name = p[:-5].split("_", 1)
        cls = cifar_class(wnid)
        if cls:
            dest, kind = os.path.join(out, "in", cls, p), "in"
        elif wnid in EXCLUDED_WNIDS:
            dest, kind = None, "excluded"
        else:
            dest, kind = os.path.join(out, "out", p), "out"
        if dest:
            write(dest, git_read(repo, commit, p))
        rows.append((p, name, kind, cls or ""))
    with open(os.path.join(out, "mapping.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "imagenet_class", "set", "cifar_class"])
        w.writerows(rows)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data")
    args = ap.parse_args()
    val = build_val(os.path.join(args.out, "ood-val"))
    chk = build_check(os.path.join(args.out, "ood-check"))
    outliers = build_outliers(os.path.join(args.out, "outliers"))
    in_class = build_in_class(os.path.join(args.out, "web-in"))
    tiny, copies = build_tiny_imagenet(os.path.join(args.out, "tiny-imagenet"), os.path.join(args.out, "ood-check"))
    print("ood-val: %d images" % len(val))
    for kind in ("in", "out", "excluded"):
        print("ood-check %s: %d" % (kind, sum(r[2] == kind for r in chk)))
    print("outliers: %d images" % len(outliers))
    print("web-in: %d images (train and val halves)" % len(in_class))
    for half in ("train", "val"):
        for kind in ("in", "out"):
            print("tiny-imagenet %s/%s: %d" % (half, kind, sum(r[0].startswith("%s/%s/" % (half, kind)) for r in tiny)))
    print("tiny-imagenet: %d left out as copies of check photos" % copies)
