"""Does the running service tell out-of-class photos from in-class ones? Every image of two folders
is sent to `POST /predict` as a user sends it, and the answers' own `ood_score` and
`in_distribution` are scored: AUROC (out-of-class scoring higher), and the share flagged in each.

    make up; python -m scripts.ood_check --in data/ood-check/in --out data/ood-check/out
"""
import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from training.recipe.images import image_files
from training.ship.ood import auroc


def answers(url: str, folder: Path, clients: int) -> list[dict]:
    files = image_files(folder)

    def ask(path: Path) -> dict:
        response = requests.post(f"{url}/predict", files={"image": (path.name, path.read_bytes())}, timeout=60)
        return response.json()
    with ThreadPoolExecutor(clients) as pool:
        return [a for a in pool.map(ask, files) if a.get("success")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:5000")
    parser.add_argument("--in", dest="inside", required=True, help="photos of the ten classes")
    parser.add_argument("--out", dest="outside", required=True, help="photos of none of them")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    inside, outside = (answers(args.url, Path(folder), args.clients) for folder in (args.inside, args.outside))
    if any(a["ood_score"] is None for a in inside + outside):
        raise SystemExit("the served version has no out-of-distribution head (ood_score is null)")
    scores = [np.array([a["ood_score"] for a in group]) for group in (inside, outside)]
    flagged = [float(np.mean([not a["in_distribution"] for a in group])) for group in (inside, outside)]
    print(json.dumps({"model_version": inside[0]["model_version"], "in_class": len(inside), "out_of_class": len(outside),
                      "auroc": round(auroc(*scores), 4), "flagged_in_class": round(flagged[0], 4),
                      "flagged_out_of_class": round(flagged[1], 4)}, indent=1))


if __name__ == "__main__":
    main()
