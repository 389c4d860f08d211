"""docker-compose.yml: accepted by Debian's docker-compose (v1), and wired as the stack needs.

Checks run on the file as docker-compose itself resolves it (`docker-compose config`): env
files merged, ${VAR:-default}s filled in, YAML anchors expanded.
"""
import copy
import os
import re
from pathlib import Path

import pytest
import yaml

from k8s.tests import policy, timings
from k8s.tests.manifests import COMPOSE_FILE, ROOT, STACK_ENV, compose, compose_config
from k8s.tests.manifests import read_env_file, rendered

STACK = read_env_file(STACK_ENV)
STACK_USERS = ("gateway", "worker", "trainer", "trainer-gpu")


@pytest.fixture(scope="module")
def services():
    return compose_config()["services"]


def env_of(services, service):
    return {k: str(v) for k, v in (services[service].get("environment") or {}).items()}


def test_config_is_valid():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_config_rejects_broken_file(tmp_path):
    """The validation can fail: an unknown depends_on condition is an error."""
    broken = COMPOSE_FILE.read_text().replace("condition: service_healthy",
                                              "condition: service_happy", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = compose("config", "-q", file=tmp_path / "docker-compose.yml")
    assert result.returncode != 0
    assert "service_happy" in result.stderr


def test_services_and_profiles(services):
    assert set(services) == {"redis", "model-init", "tfserving", "worker", "gateway",
                             "trainer", "trainer-gpu"}
    # `docker compose up` starts the serving stack; training only when asked for.
    assert {s for s, c in services.items() if not c.get("profiles")} == {
        "redis", "model-init", "tfserving", "worker", "gateway"}
    assert services["trainer"]["profiles"] == ["train"]
    assert services["trainer-gpu"]["profiles"] == ["train-gpu"]


def test_stack_env_is_loaded(services):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for service in STACK_USERS:
        env_files = raw["services"][service].get("env_file") or raw["x-trainer"]["env_file"]
        assert "common/stack.env" in env_files
        assert STACK.items() <= env_of(services, service).items()


def test_service_settings_match_kubernetes(services):
    """gateway/worker settings equal the k8s ConfigMaps' (both come from k8s/base/config)."""
    objs = rendered("k8s")
    for service in ("gateway", "worker"):
        cm = next(o for o in objs if o["kind"] == "ConfigMap"
                  and o["metadata"]["name"].startswith(f"{service}-config"))
        assert cm["data"].items() <= env_of(services, service).items()


def test_images_pinned_and_same_as_kubernetes(services):
    k8s_images = {c["image"] for w in policy.workloads(rendered("k8s")) for c in policy.containers(w)}
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"
        if name != "model-init":
            assert image in k8s_images, f"{name}: {image} differs from the k8s manifests"


def test_start_order_and_healthchecks(services):
    deps = {s: c.get("depends_on", {}) for s, c in services.items()}
    assert deps["tfserving"] == {"model-init": {"condition": "service_completed_successfully"}}
    assert deps["worker"] == {"redis": {"condition": "service_healthy"},
                              "tfserving": {"condition": "service_healthy"}}
    assert deps["gateway"] == {"redis": {"condition": "service_healthy"},
                               "worker": {"condition": "service_healthy"}}
    for service in ("trainer", "trainer-gpu"):
        assert deps[service] == {"model-init": {"condition": "service_completed_successfully"}}
    # service_healthy needs a healthcheck: in compose, or the image's HEALTHCHECK.
    for service in ("redis", "tfserving"):
        assert services[service]["healthcheck"]["test"]
    for service in ("worker", "gateway"):
        assert "HEALTHCHECK --" in (ROOT / service / "Dockerfile").read_text()


def redis_script(services) -> str:
    command = services["redis"]["command"]
    assert command[:2] == ["sh", "-ec"]
    return command[2].replace("$$", "$")  # compose's escape for a literal $


def test_redis_password_is_one_value(services):
    """REDIS_URL carries the password redis-server requires, including when it is overridden;
    redis-server reads it from the environment, into its config file, never from argv."""
    for config in (services, _config_with(REDIS_PASSWORD="s3cret")["services"]):
        password = config["redis"]["environment"]["REDIS_PASSWORD"]
        assert config["redis"]["environment"]["REDISCLI_AUTH"] == password
        assert not any(password in arg for arg in config["redis"]["command"])
        assert "redis-cli ping" in " ".join(config["redis"]["healthcheck"]["test"])
        for service in ("gateway", "worker"):
            assert config[service]["environment"]["REDIS_URL"] == (
                f"redis://:{password}@redis:{STACK['REDIS_PORT']}/0")
    assert '"$REDIS_PASSWORD" > /run/redis/redis.conf' in redis_script(services)
    assert "/run/redis" in services["redis"]["tmpfs"]  # the config file stays in memory
    assert services["redis"]["read_only"] is True
    assert any(v.endswith(":/data:rw") for v in services["redis"]["volumes"])


def test_redis_starts_as_in_kubernetes(services):
    """Same start script, same settings (AOF every second, maxmemory, noeviction), same user."""
    redis = policy.container(policy.workload(rendered("k8s"), "redis"), "redis")
    assert services["redis"]["command"][:2] == redis["command"][:2]
    assert redis_script(services) == redis["command"][2]
    assert services["redis"]["command"][3:] == redis["command"][3:] + redis["args"]
    pod = policy.pod_template(policy.workload(rendered("k8s"), "redis"))["spec"]["securityContext"]
    assert services["redis"]["user"] == f"{pod['runAsUser']}:{pod['runAsGroup']}"


def test_redis_memory_bounds_the_queue(services):
    """QUEUE_MAX_BYTES (gateway) < Redis maxmemory (noeviction) < the redis container's mem_limit."""
    args = services["redis"]["command"][3:]
    assert policy.flag(args, "--maxmemory-policy") == "noeviction"
    assert policy.flag(args, "--appendfsync") == "everysec"
    assert policy.flag(args, "--appendonly") == "yes"
    queue = int(env_of(services, "gateway")["QUEUE_MAX_BYTES"])
    maxmemory = policy.redis_bytes(policy.flag(args, "--maxmemory"))
    limit = policy.redis_bytes(str(services["redis"]["mem_limit"]).replace("m", "mb"))
    assert queue < maxmemory < limit


def test_stop_grace_periods_cover_shutdown(services):
    """docker stop waits 10 s by default; the gateway and the worker need longer (see timings)."""
    def seconds(value):
        assert str(value).endswith("s"), value
        return float(str(value)[:-1])

    gateway = timings.gateway(env_of(services, "gateway"))
    assert seconds(services["gateway"]["stop_grace_period"]) >= (
        gateway["graceful_timeout_s"] + timings.GATEWAY_MARGIN_S)
    worker = timings.worker(env_of(services, "worker"))
    assert seconds(services["worker"]["stop_grace_period"]) >= (
        worker["slowest_batch_s"] + timings.WORKER_MARGIN_S)
    assert worker["claim_idle_ms"] / 1000 < float(env_of(services, "gateway")["RESULT_TIMEOUT_S"])


def _config_with(**env):
    result = compose("config", env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _flag(args, option):
    return next(a.split("=", 1)[1] for a in args if a.startswith(option + "="))


def test_model_server_and_trainer_agree(services):
    tfs = services["tfserving"]
    assert tfs["image"].startswith("tensorflow/serving:")
    args = tfs["command"]
    base_path = f"/models/{STACK['MODEL_NAME']}"
    assert _flag(args, "--model_name") == STACK["MODEL_NAME"]
    assert _flag(args, "--model_base_path") == base_path
    assert _flag(args, "--port") == STACK["TFSERVING_GRPC_PORT"]
    assert _flag(args, "--rest_api_port") == STACK["TFSERVING_REST_PORT"]
    health = " ".join(tfs["healthcheck"]["test"])
    assert f"/{STACK['TFSERVING_REST_PORT']}" in health
    assert f"/v1/models/{STACK['MODEL_NAME']} " in health
    assert env_of(services, "worker")["TFSERVING_ADDRESS"] == f"tfserving:{STACK['TFSERVING_GRPC_PORT']}"
    assert env_of(services, "worker")["MODEL_NAME"] == STACK["MODEL_NAME"]
    for service in ("trainer", "trainer-gpu"):
        command = services[service]["command"]
        assert command[command.index("--export-base") + 1] == base_path


def test_one_model_volume(services):
    """model-init seeds, the trainers write and TF Serving reads the same named volume."""
    mounts = {s: [v for v in services[s]["volumes"] if v.startswith("models:")]
              for s in ("model-init", "tfserving", "trainer", "trainer-gpu")}
    assert mounts == {"model-init": ["models:/models:rw"], "tfserving": ["models:/models:ro"],
                      "trainer": ["models:/models:rw"], "trainer-gpu": ["models:/models:rw"]}
    assert "models" in compose_config()["volumes"]


def test_seed_model_is_shipped(services):
    """model-init seeds the highest version of the repository's models/<name>/, whatever its
    number (k8s/tests/test_seed_scripts.py runs the script); that version is a SavedModel."""
    seed = next(v for v in services["model-init"]["volumes"] if v.endswith(":/seed:ro"))
    host_dir = Path(seed.split(":")[0])
    assert host_dir == ROOT / "models"
    versions = sorted(int(p.name) for p in (host_dir / STACK["MODEL_NAME"]).iterdir()
                      if p.is_dir() and p.name.isdigit())
    assert versions, f"no model version under {host_dir / STACK['MODEL_NAME']}"
    assert (host_dir / STACK["MODEL_NAME"] / str(versions[-1]) / "saved_model.pb").is_file()
    script = services["model-init"]["command"][2]
    assert f"src=/seed/{STACK['MODEL_NAME']}\n" in script
    assert "sort -n | tail -n 1" in script
    assert f"/seed/{STACK['MODEL_NAME']}/" not in script  # no version number written in


def published(config) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of every port compose publishes."""
    out = []
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # how docker-compose renders a port without an address
                out.append((name, port.get("host_ip", "0.0.0.0"), int(port["published"]),
                            int(port["target"])))
                continue
            spec = str(port).split("/")[0].split(":")
            address = spec[0] if len(spec) == 3 else "0.0.0.0"
            out.append((name, address, int(spec[-2]), int(spec[-1])))
    return out


def test_worker_scales_and_gateway_is_published(services):
    # --scale worker=N needs no fixed container name and no host port.
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]
    port = int(STACK["GATEWAY_PORT"])
    assert published(compose_config()) == [("gateway", "127.0.0.1", port, port)]
    assert env_of(services, "gateway")["GUNICORN_BIND"] == f"0.0.0.0:{port}"


def exposed_metrics(config) -> list[str]:
    """Ports that serve /metrics (the gateway's, the worker's) published beyond 127.0.0.1."""
    metrics_ports = {int(STACK["GATEWAY_PORT"]), int(STACK["WORKER_METRICS_PORT"])}
    return [f"{name} publishes {target} on {address}"
            for name, address, _, target in published(config)
            if target in metrics_ports and address != "127.0.0.1"]


def test_metrics_are_published_on_loopback_only():
    """The gateway's port serves /metrics, the worker's metrics port too: by default nothing is
    published beyond 127.0.0.1; GATEWAY_HOST_IP opens the gateway (and its /metrics) on purpose."""
    assert exposed_metrics(compose_config()) == []
    opened = _config_with(GATEWAY_HOST_IP="0.0.0.0")
    assert exposed_metrics(opened) == [f"gateway publishes {STACK['GATEWAY_PORT']} on 0.0.0.0"]


def test_published_port_check_catches_all_interfaces():
    """The check can fail: ports published without an address listen on every interface."""
    config = copy.deepcopy(compose_config())
    config["services"]["worker"]["ports"] = [{"published": 9100, "target": 9100}]
    config["services"]["gateway"]["ports"] = ["5000:5000/tcp"]
    assert sorted(exposed_metrics(config)) == ["gateway publishes 5000 on 0.0.0.0",
                                               "worker publishes 9100 on 0.0.0.0"]


@pytest.mark.parametrize("service,variant,tag", [("trainer", "cpu", "1.0.0"),
                                                  ("trainer-gpu", "gpu", "1.0.0-gpu")])
def test_trainer_variants(services, service, variant, tag):
    config = services[service]
    assert config["build"]["args"] == {"TF_VARIANT": variant}
    assert config["image"] == f"cifar10/trainer:{tag}"
    devices = config.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert (devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]) == (
        variant == "gpu")
