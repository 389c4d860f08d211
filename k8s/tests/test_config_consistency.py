"""common/stack.env is the one source of shared values; the k8s copy may not drift from it.

(Compose loads common/stack.env itself; test_compose checks that. The literal ports, model
name and paths in the manifests are checked against it by policy.check_stack_values.)
"""
from k8s.tests.manifests import K8S_CONFIG, STACK_ENV, read_env_file, rendered

# What the services read from the stack values (see common/settings.py and the services).
REQUIRED = {"MODEL_NAME", "GATEWAY_PORT", "TFSERVING_GRPC_PORT", "TFSERVING_REST_PORT",
            "REDIS_PORT", "WORKER_METRICS_PORT", "JOB_STREAM", "JOB_GROUP", "RESULT_KEY_PREFIX"}


def drift(copy_path, source_path=STACK_ENV) -> dict:
    """Keys the copy defines with another value than the source (or that the source lacks)."""
    source = read_env_file(source_path)
    return {k: v for k, v in read_env_file(copy_path).items() if source.get(k) != v}


def test_k8s_copy_agrees_with_common():
    assert REQUIRED <= read_env_file(STACK_ENV).keys()
    assert REQUIRED <= read_env_file(K8S_CONFIG / "stack.env").keys()
    assert drift(K8S_CONFIG / "stack.env") == {}


def test_configmap_is_the_k8s_copy():
    cm = next(o for o in rendered("k8s") if o["kind"] == "ConfigMap"
              and o["metadata"]["name"].startswith("stack-config"))
    assert cm["data"] == read_env_file(K8S_CONFIG / "stack.env")


def test_service_settings_files_do_not_override_stack_values():
    """Per-service settings must not shadow a shared value with a different one."""
    common = read_env_file(STACK_ENV)
    for service in ("gateway", "worker"):
        settings = read_env_file(K8S_CONFIG / f"{service}.env")
        assert settings.keys().isdisjoint(common), service


def test_drift_is_caught(tmp_path):
    drifted = tmp_path / "stack.env"
    drifted.write_text((K8S_CONFIG / "stack.env").read_text().replace(
        "TFSERVING_GRPC_PORT=8500", "TFSERVING_GRPC_PORT=9500"))
    assert drift(drifted) == {"TFSERVING_GRPC_PORT": "9500"}
