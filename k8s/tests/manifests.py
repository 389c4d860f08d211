"""Loading what the deployment tests check: kustomize renders, compose config, env files."""
import functools
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
STACK_ENV = ROOT / "common" / "stack.env"
K8S_CONFIG = K8S / "base" / "config"
NAMESPACE = "cifar10"
# The Kubernetes version the schemas are checked against.
K8S_VERSION = "1.32.0"

# Every kustomization `kubectl apply -k` may be pointed at, with what it must deploy.
# test_k8s_render fails if a kustomization is added without an entry here.
OVERLAYS = {
    "k8s": {"gpu": True},
    "k8s/base": {"gpu": False},
    "k8s/overlays/production": {"gpu": True},
    "k8s/overlays/cpu": {"gpu": False},
    "k8s/overlays/keda": {"gpu": True, "keda": True},
}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped (the format of common/stack.env)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def kustomize(directory: Path | str) -> list[dict]:
    """The objects `kubectl kustomize DIR` renders (the real kubectl and its kustomize)."""
    result = subprocess.run(["kubectl", "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(ROOT / overlay))


def compose(*args: str, env: dict | None = None, file: Path = COMPOSE_FILE):
    """Runs Debian's docker-compose (v1) on the compose file; returns the CompletedProcess."""
    return subprocess.run(["docker-compose", "-f", str(file), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


@functools.lru_cache(maxsize=None)
def compose_config() -> dict:
    """The compose file as docker-compose resolves it (env files, defaults, anchors)."""
    result = compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)
