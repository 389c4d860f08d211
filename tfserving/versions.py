"""How TF Serving's file system source sees a model base path (no TensorFlow needed)."""
from pathlib import Path


def list_versions(base_path: Path) -> list[int]:
    """Integer-named subdirectories holding a SavedModel, lowest first; others (e.g. staging) are ignored."""
    if not base_path.is_dir():
        return []
    return sorted(int(p.name) for p in base_path.iterdir()
                  if p.name.isdigit() and (p / "saved_model.pb").is_file())
