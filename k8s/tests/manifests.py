"""Loading what the deployment tests check: kustomize renders, compose config, env files."""
import atexit
import functools
import shutil
import subprocess
import tempfile
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

# The operator's production Redis password (git-ignored, `make k8s-secret`): the production
# overlay (hence k8s/ and overlays/keda) does not render without it.
PASSWORD_FILE = "redis-password.env"
PRODUCTION_SECRET = K8S / "overlays" / "production" / PASSWORD_FILE
# What the tests (and `make validate`) render production with instead: never the operator's.
THROWAWAY_PASSWORD = "validation-only-throwaway-0123456789abcdef"

# Every kustomization `kubectl apply -k` may be pointed at, with what it must deploy.
# test_k8s_render fails if a kustomization is added without an entry here.
# gpu: the trainer asks for a GPU; tls: the Ingress serves HTTPS for its host (cert-manager);
# dev_secret: the development Redis password is acceptable.
OVERLAYS = {
    "k8s": {"gpu": True, "tls": True, "dev_secret": False},
    "k8s/base": {"gpu": False, "tls": True, "dev_secret": True},
    "k8s/overlays/production": {"gpu": True, "tls": True, "dev_secret": False},
    "k8s/overlays/cpu": {"gpu": False, "tls": False, "dev_secret": True},
    "k8s/overlays/keda": {"gpu": True, "tls": True, "dev_secret": False, "keda": True},
    "k8s/overlays/monitoring": {"gpu": True, "tls": True, "dev_secret": False},
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


def copy_tree(dest: Path, password: str | None = THROWAWAY_PASSWORD) -> Path:
    """k8s/ copied under dest as a clean checkout has it (no password file), plus a production
    password file with `password` unless it is None. Returns dest, the root overlays are under."""
    shutil.copytree(K8S, Path(dest) / "k8s", ignore=shutil.ignore_patterns(
        PASSWORD_FILE, "__pycache__", "tests", "trainjob", "*.py"))
    if password is not None:
        (Path(dest) / PRODUCTION_SECRET.relative_to(ROOT)).write_text(f"REDIS_PASSWORD={password}\n")
    return Path(dest)


@functools.lru_cache(maxsize=None)
def render_root() -> Path:
    """One copy of k8s/ with the throwaway password, for the whole test session."""
    root = Path(tempfile.mkdtemp(prefix="k8s-render-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return copy_tree(root)


@functools.lru_cache(maxsize=None)
def rendered(overlay: str) -> tuple[dict, ...]:
    """The objects of one kustomization ("k8s/overlays/cpu"), production with THROWAWAY_PASSWORD."""
    return tuple(kustomize(render_root() / overlay))


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
