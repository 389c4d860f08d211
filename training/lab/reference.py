"""The reference recipe on this project's images: Keller Jordan's airbench94.py, unchanged, trained
and tested on the data the port uses (the JPEG copy here), to tell the data's share of the gap
between the port and the published 94.0% from the port's own (README "Backends and GPU runs").
A measurement on a GPU machine with PyTorch; the reference file is not part of the project.

    python -m training.lab.reference airbench94.py --data data --out runs/reference
    python -m training.lab.reference airbench94.py --cpu --runs 1   # no GPU: float32 on the CPU, 1 run

--cpu runs a copy edited only where the reference names CUDA or float16 (CPU_EDITS: its data and
network in float32 on the CPU, a wall clock for its CUDA timers), and --runs sets how many of its
25 runs train; each edit must match, so a changed reference fails rather than runs half-edited.

The images become the reference's own data cache in OUT (cifar10/train.pt and test.pt: uint8
NHWC images, labels, class names: what it writes after downloading), so it neither downloads
nor needs torchvision, for which a stand-in of the one function it then uses (Normalize) is put
on the path where torchvision is missing. Its output goes to OUT/airbench94.log, the mean and
standard deviation of its runs' test accuracy to OUT/reference-result.json.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from training.recipe.data import CLASS_NAMES, dataset_label, load_cifar10

TORCHVISION_STAND_IN = {
    "__init__.py": "from . import transforms  # noqa: F401\n",
    "transforms.py": '''import torch


class Normalize:
    """torchvision.transforms.Normalize on [..., C, H, W] tensors."""

    def __init__(self, mean, std):
        self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)

    def __call__(self, x):
        return (x - self.mean.to(x).view(-1, 1, 1)) / self.std.to(x).view(-1, 1, 1)
''',
}
CPU_EDITS = (
    ("map_location=torch.device(gpu)", "map_location='cpu'", 1),
    ("self.images.half()", "self.images.float()", 1),
    ("net = net.half().cuda()", "net = net.float()", 1),
    ("torch.cuda.Event(enable_timing=True)", "WallClock()", 2),
    ("torch.cuda.synchronize()", "None", 3),
    ("import torch.nn.functional as F\n", """import torch.nn.functional as F
import time


class WallClock:
    \"\"\"The CUDA event timer's interface on the CPU, whose work is done when each call returns.\"\"\"

    def record(self):
        self.seconds = time.perf_counter()

    def elapsed_time(self, end):
        return 1e3 * (end.seconds - self.seconds)
""", 1),
)
RUNS = re.compile(r"for run in range\((\d+)\)")
SUMMARY = re.compile(r"Mean:\s*([0-9.]+)\s+Std:\s*([0-9.]+|nan)")  # one run's std is nan


def write_data_cache(data_dir, out):
    """OUT/cifar10/{train,test}.pt as the reference caches CIFAR-10 after its download."""
    import torch
    train, test = load_cifar10(data_dir)
    cache = Path(out) / "cifar10"
    cache.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(split.images)),
                    "labels": torch.from_numpy(np.asarray(split.labels, np.int64)),
                    "classes": list(CLASS_NAMES)}, cache / f"{name}.pt")
    return len(train.labels), len(test.labels)


def edited(code, cpu, runs):
    """The reference's code for this machine: CPU_EDITS with --cpu, RUNS runs where given."""
    edits = list(CPU_EDITS if cpu else ())
    if runs:
        default = RUNS.search(code)
        if not default:
            sys.exit("error: the reference has no 'for run in range(N)' to set --runs in")
        edits.append((default.group(0), f"for run in range({runs})", 1))
    for old, new, count in edits:
        if code.count(old) != count:
            sys.exit(f"error: the reference has {code.count(old)} of {old!r} where {count} was expected")
        code = code.replace(old, new)
    return code


def python_path(out):
    """PYTHONPATH for the reference: the stand-in for torchvision first, where it is missing."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if importlib.util.find_spec("torchvision") is None:
        package = Path(out) / "stand-in" / "torchvision"
        package.mkdir(parents=True, exist_ok=True)
        for name, text in TORCHVISION_STAND_IN.items():
            (package / name).write_text(text)
        paths.insert(0, str(package.parent))
    return os.pathsep.join(paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="airbench94.py (legacy/airbench94.py of KellerJordan/cifar10-airbench)")
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="runs/reference")
    parser.add_argument("--cpu", action="store_true", help="float32 on the CPU instead of float16 on CUDA")
    parser.add_argument("--runs", type=int, help="how many runs (the reference's own: 25)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    script = out / "airbench94.py"
    script.write_text(edited(Path(args.reference).read_text(), args.cpu, args.runs))
    n_train, n_test = write_data_cache(args.data, out)
    print(f"{out}/cifar10: {n_train} train and {n_test} test images ({dataset_label(args.data)})", flush=True)
    log = out / "airbench94.log"
    with open(log, "w") as sink:
        status = subprocess.run([sys.executable, script.name], cwd=out, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": python_path(out), "PYTHONUNBUFFERED": "1"}).returncode
    found = SUMMARY.findall(log.read_text())
    if status or not found:
        sys.exit(f"error: the reference exited with {status}{'' if found else ' and no summary'}; see {log}")
    mean, std = (float(x) for x in found[-1])
    std = None if math.isnan(std) else std
    result = {"reference": Path(args.reference).name, "dataset": dataset_label(args.data),
              "device": "cpu (float32)" if args.cpu else "cuda (float16)", "runs": args.runs or "its own",
              "test_accuracy_mean": mean, "test_accuracy_std": std}
    (out / "reference-result.json").write_text(json.dumps(result, indent=2))
    spread = "" if std is None else f" ± {std:.4f}"
    print(f"airbench94 on {result['dataset']}, {result['device']}: test accuracy {mean:.4f}{spread}, {result['runs']} runs")


if __name__ == "__main__":
    main()
