"""The production Redis password is the operator's: `kubectl kustomize k8s/` (production, keda)
fails, naming the missing file, until k8s/overlays/production/redis-password.env exists; then
every pod uses that password. The file is git-ignored and never in an image; `make k8s-secret`
creates it. The development overlays keep rendering with the base's development password."""
import base64
import os
import stat
import subprocess

import pytest

from k8s.tests import policy
from k8s.tests.manifests import (OVERLAYS, PASSWORD_FILE, PRODUCTION_SECRET, ROOT, copy_tree,
                                 kustomize, read_env_file)

NEEDS_PASSWORD = [o for o, flags in OVERLAYS.items() if not flags["dev_secret"]]
DEVELOPMENT = [o for o, flags in OVERLAYS.items() if flags["dev_secret"]]


def kustomize_result(directory):
    return subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120)


def redis_password(objs) -> str:
    redis = policy.container(policy.workload(objs, "redis"), "redis")
    ref = next(v["valueFrom"]["secretKeyRef"] for v in redis["env"] if v["name"] == "REDIS_PASSWORD")
    return base64.b64decode(policy.get(objs, "Secret", ref["name"])["data"][ref["key"]]).decode()


@pytest.fixture(scope="module")
def clean_checkout(tmp_path_factory):
    """k8s/ as a fresh clone has it: no password file."""
    return copy_tree(tmp_path_factory.mktemp("clean"), password=None)


@pytest.mark.parametrize("overlay", NEEDS_PASSWORD)
def test_production_does_not_render_without_the_password_file(clean_checkout, overlay):
    assert not (clean_checkout / PRODUCTION_SECRET.relative_to(ROOT)).exists()
    result = kustomize_result(clean_checkout / overlay)
    assert result.returncode != 0
    assert result.stdout == ""  # nothing half-rendered to pipe into kubectl apply
    assert f"{PASSWORD_FILE}: no such file or directory" in result.stderr, result.stderr
    assert "overlays/production" in result.stderr


@pytest.mark.parametrize("overlay", DEVELOPMENT)
def test_development_overlays_render_without_it(clean_checkout, overlay):
    result = kustomize_result(clean_checkout / overlay)
    assert result.returncode == 0, result.stderr


def test_the_overlay_says_how_to_create_it():
    text = (ROOT / "k8s/overlays/production/kustomization.yaml").read_text()
    assert f"envs: [{PASSWORD_FILE}]" in text
    assert "make k8s-secret" in text and "behavior: replace" in text


def test_every_pod_uses_the_operators_password(tmp_path):
    password = "0123456789abcdef0123456789abcdef"
    objs = kustomize(copy_tree(tmp_path, password=password) / "k8s")
    assert redis_password(objs) == password
    assert policy.check_redis_secret(objs, dev_secret=False) == []
    # Gateway and worker build REDIS_URL from the same (hash-named) Secret as redis-server.
    assert policy.check_references(objs) == []
    assert policy.check_stack_values(objs, read_env_file(ROOT / "common/stack.env")) == []
    secrets = {v["valueFrom"]["secretKeyRef"]["name"]
               for w in policy.workloads(objs) for c in policy.containers(w)
               for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
    assert len(secrets) == 1


def test_development_overlays_keep_the_development_password(clean_checkout):
    objs = kustomize(clean_checkout / "k8s/overlays/cpu")
    assert redis_password(objs) == policy.DEV_REDIS_PASSWORD


def test_password_file_is_never_committed_nor_in_an_image():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    relative = str(PRODUCTION_SECRET.relative_to(ROOT))
    ignored = subprocess.run(["git", "check-ignore", "-q", relative], cwd=ROOT)
    assert ignored.returncode == 0, f"{relative} is not git-ignored"
    tracked = subprocess.run(["git", "ls-files", "--", relative], cwd=ROOT, capture_output=True,
                             text=True)
    assert tracked.stdout == ""
    # .dockerignore is an allow-list (`*` first) that lets nothing under k8s/ back in.
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    assert not [ln for ln in lines if ln.startswith("!") and ln[1:].lstrip("/").startswith("k8s")]


def test_make_k8s_secret_writes_a_private_file_once(tmp_path):
    target = tmp_path / PASSWORD_FILE
    make = ["make", "-s", "k8s-secret", f"K8S_SECRET={target}"]
    result = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    password = read_env_file(target)["REDIS_PASSWORD"]
    assert len(password) == 64 and policy.URL_SAFE.fullmatch(password)
    again = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "kept" in again.stdout
    assert read_env_file(target)["REDIS_PASSWORD"] == password  # never overwritten
    # What production renders from that file passes the secret policy.
    objs = kustomize(copy_tree(tmp_path / "tree", password=password) / "k8s/overlays/production")
    assert policy.check_redis_secret(objs, dev_secret=False) == []


def test_operators_password_file_if_present_is_usable():
    """The real file, where an operator has created it: one URL-safe REDIS_PASSWORD, private."""
    if not PRODUCTION_SECRET.exists():
        pytest.skip(f"no {PRODUCTION_SECRET.relative_to(ROOT)} (a clean checkout)")
    values = read_env_file(PRODUCTION_SECRET)
    assert set(values) == {"REDIS_PASSWORD"}
    password = values["REDIS_PASSWORD"]
    assert policy.URL_SAFE.fullmatch(password) and len(password) >= 16
    assert password != policy.DEV_REDIS_PASSWORD
    assert stat.S_IMODE(os.stat(PRODUCTION_SECRET).st_mode) & 0o077 == 0, "readable by others"
