"""The Dockerfiles, parsed with BuildKit's own parser (the `dockerfile` package): pinned bases and
packages, multi-stage, non-root, the run contract, health checks, pip's CA and cache kept out of
every layer, build context."""
import re
from pathlib import Path

import dockerfile
import pytest

from k8s.tests.manifests import ROOT, STACK_ENV, read_env_file

STACK = read_env_file(STACK_ENV)
SERVICES = ("training", "gateway", "worker", "tfserving")
KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "CMD",
         "ENTRYPOINT", "LABEL"}
CONTRACT = {
    "training": {"ENTRYPOINT": ("python", "-m", "training.train")},
    "gateway": {"CMD": ("gunicorn", "-c", "gateway/gunicorn.conf.py", "gateway.app:create_app()")},
    "worker": {"CMD": ("python", "-m", "worker")},
    "tfserving": {"ENTRYPOINT": ("python", "-m", "tfserving.standin")},
}


def parse(service):
    return dockerfile.parse_file(str(ROOT / service / "Dockerfile"))


def final_stage(commands):
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def build_args(commands):
    """ARG defaults declared before the first FROM (the ones FROM can use)."""
    args = {}
    for c in commands:
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, value = c.value[0].split("=", 1)
            args[key] = value
    return args


@pytest.mark.parametrize("service", SERVICES)
def test_instructions_are_known(service):
    assert {c.cmd for c in parse(service)} <= KNOWN


def test_one_pinned_base_image():
    bases = {build_args(parse(s))["PYTHON_IMAGE"] for s in SERVICES}
    assert len(bases) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases.pop())


@pytest.mark.parametrize("service", SERVICES)
def test_multi_stage_from_the_pinned_base(service):
    commands = parse(service)
    froms = [c.value for c in commands if c.cmd == "FROM"]
    assert froms[0] == ("${PYTHON_IMAGE}", "AS", "deps")
    assert froms[-1] == ("${PYTHON_IMAGE}",)
    copies = [c for c in final_stage(commands) if c.cmd == "COPY" and "--from=deps" in c.flags]
    assert copies[0].value == ("/opt/venv", "/opt/venv")
    # The worker also takes the TF Serving messages compiled in the deps stage, and nothing else.
    assert [c.value for c in copies[1:]] == ([("/src/worker/protos/tfserving_apis_pb2.py", "worker/protos/")]
                                             if service == "worker" else [])


@pytest.mark.parametrize("service", SERVICES)
def test_pinned_requirements_installed_with_ca_and_cache_outside_the_layers(service):
    """pip's CA bundle is a BuildKit secret and its cache a cache mount: neither is in any layer."""
    installs = [c for c in parse(service) if c.cmd == "RUN" and "pip install" in c.value[0]]
    assert len(installs) == 1
    assert set(installs[0].flags) == {"--mount=type=secret,id=pip-ca", "--mount=type=cache,target=/root/.cache/pip"}
    assert "export PIP_CERT=/run/secrets/pip-ca" in installs[0].value[0]
    text = (ROOT / service / "Dockerfile").read_text()
    assert "ca-certificates.crt" not in text and "COPY /etc" not in text
    assert f"COPY {service}/requirements.txt" in (ROOT / service / "Dockerfile").read_text()
    for line in (ROOT / service / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line.strip()), line


@pytest.mark.parametrize("service", SERVICES)
def test_runs_as_non_root_from_app(service):
    stage = final_stage(parse(service))
    users = [c.value[0] for c in stage if c.cmd == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    assert [c.value for c in stage if c.cmd == "WORKDIR"] == [("/app",)]
    env = dict(zip(*[iter(v for c in stage if c.cmd == "ENV" for v in c.value)] * 2))
    assert env["PYTHONPATH"] == "/app"


@pytest.mark.parametrize("service", SERVICES)
def test_run_contract(service):
    stage = final_stage(parse(service))
    for instruction, expected in CONTRACT[service].items():
        found = [c for c in stage if c.cmd == instruction]
        assert found and found[-1].json and found[-1].value == expected


@pytest.mark.parametrize("service,port", [("gateway", STACK["GATEWAY_PORT"]),
                                          ("worker", STACK["WORKER_METRICS_PORT"])])
def test_healthcheck_and_port(service, port):
    stage = final_stage(parse(service))
    assert [c.value for c in stage if c.cmd == "EXPOSE"] == [(port,)]
    health = " ".join(next(c for c in stage if c.cmd == "HEALTHCHECK").value)
    assert f"http://127.0.0.1:{port}/healthz" in health


def test_trainer_has_no_healthcheck_and_a_gpu_variant():
    commands = parse("training")
    assert ("NONE",) in [c.value for c in commands if c.cmd == "HEALTHCHECK"]
    assert ("TF_VARIANT=cpu",) in [c.value for c in commands if c.cmd == "ARG"]
    text = (ROOT / "training" / "Dockerfile").read_text()
    assert 'gpu) extra="tensorflow[and-cuda]==${tf_version}"' in text
    # BACKEND=jax adds JAX at the dev requirements' pin: CUDA wheels for the GPU variant.
    assert ("BACKEND=tensorflow",) in [c.value for c in commands if c.cmd == "ARG"]
    assert 'jax/gpu) jax="jax[cuda12]==${jax_version}"' in text
    assert "COPY training/requirements-jax.txt" in text
    # Every shipped version is in the image (.dockerignore admits exactly those): 1 is the
    # teacher the student config reads, the highest seeds an empty model volume in Kubernetes.
    assert ("models/cifar10/", "models/cifar10/") in [c.value for c in commands
                                                      if c.cmd == "COPY"]


def test_gateway_image_carries_its_api_document_and_docs_page():
    """GET /openapi.json and /docs serve files of the gateway package, Swagger UI's included:
    nothing is fetched from a CDN, so the image must hold them."""
    sources = [src.rstrip("/") for c in final_stage(parse("gateway")) if c.cmd == "COPY" and not c.flags
               for src in c.value[:-1]]
    for path in ("gateway/openapi.json", "gateway/static/swagger/index.html",
                 "gateway/static/swagger/swagger-initializer.js", "gateway/static/swagger/swagger-ui-bundle.js",
                 "gateway/static/swagger/swagger-ui.css", "gateway/static/swagger/LICENSE"):
        assert (ROOT / path).is_file(), path
        assert any(path == src or path.startswith(src + "/") for src in sources), f"no COPY brings {path}"
        assert not ignored(path), f".dockerignore leaves out {path}"


def test_gateway_image_carries_the_web_page():
    """GET / serves gateway/static/index.html, which loads app.js and app.css from /static/."""
    sources = [src.rstrip("/") for c in final_stage(parse("gateway")) if c.cmd == "COPY" and not c.flags
               for src in c.value[:-1]]
    for path in ("gateway/static/index.html", "gateway/static/app.js", "gateway/static/app.css"):
        assert (ROOT / path).is_file(), path
        assert any(path == src or path.startswith(src + "/") for src in sources), f"no COPY brings {path}"
        assert not ignored(path), f".dockerignore leaves out {path}"


# ---- build context --------------------------------------------------------------------------

def _dockerignore():
    """(exception?, regex) per .dockerignore line, with Docker's matching rules."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token))
        rules.append((negate, re.compile(regex)))
    return rules


def ignored(path: str) -> bool:
    """Whether Docker leaves the path out of the build context: the last matching rule wins,
    and a rule matching a parent directory matches everything under it."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, regex in _dockerignore():
        if any(regex.fullmatch(p) for p in candidates):
            result = not negate
    return result


@pytest.mark.parametrize("service", SERVICES)
def test_copied_sources_are_in_the_context(service):
    for c in parse(service):
        if c.cmd != "COPY" or any(f.startswith("--from") for f in c.flags):
            continue
        for src in c.value[:-1]:
            path = ROOT / src
            files = ([p for p in path.rglob("*") if p.is_file()] if path.is_dir() else
                     [path] if path.exists() else list(ROOT.glob(src)))
            assert files, f"{service}/Dockerfile copies missing {src}"
            sent = [p for p in files if not ignored(str(p.relative_to(ROOT)))]
            assert sent, f"{service}/Dockerfile copies {src}, which .dockerignore leaves out"


@pytest.mark.parametrize("path,left_out", [
    ("common/stack.env", False), ("gateway/app.py", False), ("worker/requirements.txt", False),
    ("models/cifar10/4/saved_model.pb", False), ("models/cifar10/2/saved_model.pb", False),
    ("models/cifar10/2/assets.extra/model_card.json", False), ("gateway/static/app.js", False),
    ("models/cifar10/3/variables/variables.index", False), ("models/cifar10/1/saved_model.pb", True),
    ("gateway/openapi.json", False), ("gateway/static/swagger/swagger-ui-bundle.js", False),
    ("models/cifar10/5/saved_model.pb", False), ("models/cifar10/6/saved_model.pb", True), ("worker/protos/tfserving_apis.proto", False),
    ("worker/protos/tfserving_apis_pb2.py", True), ("tfserving/standin.py", False),
    (".git/HEAD", True), (".venv/bin/python", True), ("data/cifar-10-batches-py/x", True),
    ("runs/fast/ckpt", True), ("gateway/tests/test_app.py", True),
    ("training/__pycache__/train.cpython-311.pyc", True), ("k8s/base/redis.yaml", True),
])
def test_dockerignore(path, left_out):
    assert ignored(path) == left_out
