"""The policy rules hold for every overlay, and each rule catches a deliberately broken copy."""
import base64
import copy
import os
import textwrap

import pytest

from k8s.tests import policy
from k8s.tests.manifests import NAMESPACE, OVERLAYS, STACK_ENV, kustomize, read_env_file
from k8s.tests.manifests import render_root, rendered

STACK = read_env_file(STACK_ENV)


def check(objs, **overlay):
    return policy.violations(list(objs), STACK, NAMESPACE, **overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_hold(overlay):
    assert check(rendered(overlay), **OVERLAYS[overlay]) == []


# ---- each rule can fail ---------------------------------------------------------------------

def _pod(objs, app):
    return policy.pod_template(policy.workload(objs, app))["spec"]


def _container(objs, app, name=None):
    return next(c for c in policy.containers(policy.workload(objs, app))
                if c["name"] == (name or app))


def _drop_limits(objs):
    del _container(objs, "worker")["resources"]["limits"]


def _drop_init_requests(objs):
    del _container(objs, "tfserving", "seed-model")["resources"]["requests"]


def _drop_readiness(objs):
    del _container(objs, "gateway")["readinessProbe"]


def _probe_wrong_port(objs):
    _container(objs, "worker")["livenessProbe"]["httpGet"]["port"] = "http"


def _writable_root(objs):
    _container(objs, "tfserving")["securityContext"]["readOnlyRootFilesystem"] = False


def _root_user(objs):
    _pod(objs, "redis")["securityContext"]["runAsNonRoot"] = False


def _token(objs):
    del _pod(objs, "gateway")["automountServiceAccountToken"]


def _escalation(objs):
    del _container(objs, "trainer")["securityContext"]["allowPrivilegeEscalation"]


def _latest_tag(objs):
    _container(objs, "tfserving")["image"] = "tensorflow/serving:latest"


def _untagged(objs):
    _container(objs, "redis")["image"] = "redis"


def _mixed_versions(objs):
    _container(objs, "gateway")["image"] = "cifar10/gateway:9.9.9"


def _trainer_reaches_redis(objs):
    np = policy.get(objs, "NetworkPolicy", "redis")
    np["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app": "trainer"}}})


def _gateway_reaches_tfserving(objs):
    np = policy.get(objs, "NetworkPolicy", "tfserving")
    np["spec"]["ingress"][0]["from"][0]["podSelector"] = {
        "matchExpressions": [{"key": "app", "operator": "In", "values": ["worker", "gateway"]}]}


def _no_default_deny(objs):
    objs.remove(policy.get(objs, "NetworkPolicy", "default-deny-ingress"))


def _service_selector_typo(objs):
    policy.get(objs, "Service", "tfserving")["spec"]["selector"] = {"app": "tf-serving"}


def _service_wrong_target(objs):
    policy.get(objs, "Service", "gateway")["spec"]["ports"][0]["targetPort"] = 8080


def _ingress_wrong_port(objs):
    policy.get(objs, "Ingress", "gateway")["spec"]["rules"][0]["http"]["paths"][0][
        "backend"]["service"]["port"] = {"number": 80}


def _no_web_page(objs):
    paths = policy.get(objs, "Ingress", "gateway")["spec"]["rules"][0]["http"]["paths"]
    paths[:] = [p for p in paths if p["path"] != "/static/"]


def _model_name(objs):
    args = _container(objs, "tfserving")["args"]
    args[args.index("--model_name=cifar10")] = "--model_name=cifar"


def _export_base(objs):
    args = _container(objs, "trainer")["args"]
    args[args.index("--export-base") + 1] = "/models/cifar"


def _trainer_other_claim(objs):
    vol = next(v for v in _pod(objs, "trainer")["volumes"] if v["name"] == "models")
    vol["persistentVolumeClaim"]["claimName"] = "trainer-runs"


def _worker_address(objs):
    cm = next(o for o in objs if o["kind"] == "ConfigMap"
              and o["metadata"]["name"].startswith("worker-config"))
    cm["data"]["TFSERVING_ADDRESS"] = "tfserving:8501"


def _password_after_url(objs):
    env = _container(objs, "gateway")["env"]
    env.append(env.pop(0))  # REDIS_PASSWORD after REDIS_URL: $(REDIS_PASSWORD) stays literal


def _missing_secret_key(objs):
    _container(objs, "worker")["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "password"


def _no_gpu(objs):
    res = _container(objs, "trainer")["resources"]
    del res["limits"]["nvidia.com/gpu"], res["requests"]["nvidia.com/gpu"]


def _no_toleration(objs):
    del _pod(objs, "trainer")["tolerations"]


def _worker_replicas(objs):
    policy.workload(objs, "worker")["spec"]["replicas"] = 2


def _no_pdb(objs):
    objs.remove(policy.get(objs, "PodDisruptionBudget", "gateway"))


def _body_size(objs):
    policy.get(objs, "Ingress", "gateway")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"] = "1m"


def _default_namespace(objs):
    del policy.get(objs, "Service", "redis")["metadata"]["namespace"]


def _config_map(objs, service):
    return next(o for o in objs if o["kind"] == "ConfigMap"
                and o["metadata"]["name"].startswith(f"{service}-config"))


def _redis_secret(objs):
    ref = _container(objs, "redis")["env"][0]["valueFrom"]["secretKeyRef"]
    return policy.get(objs, "Secret", ref["name"])


def _redis_args(objs):
    return _container(objs, "redis")["args"]


def _redis_script(objs):
    return _container(objs, "redis")["command"]


def _requirepass_in_argv(objs):
    _redis_args(objs).extend(["--requirepass", "$(REDIS_PASSWORD)"])


def _redis_cli_password_in_argv(objs):
    _container(objs, "redis")["readinessProbe"]["exec"]["command"] = [
        "sh", "-c", "redis-cli -a \"$REDISCLI_AUTH\" ping | grep -q PONG"]


def _secret_expanded_in_args(objs):
    _container(objs, "worker")["args"] = ["--redis", "$(REDIS_PASSWORD)"]


def _no_requirepass(objs):
    c = _container(objs, "redis")
    c["command"] = ["redis-server"]


def _password_on_disk(objs):
    vol = next(v for v in _pod(objs, "redis")["volumes"] if v["name"] == "config")
    vol["emptyDir"] = {}


def _no_umask(objs):
    _redis_script(objs)[2] = _redis_script(objs)[2].replace("umask 077", "umask 022")


def _evicting(objs):
    args = _redis_args(objs)
    args[args.index("--maxmemory-policy") + 1] = "allkeys-lru"


def _no_aof_fsync(objs):
    args = _redis_args(objs)
    args[args.index("--appendfsync") + 1] = "no"


def _maxmemory_over_limit(objs):
    args = _redis_args(objs)
    args[args.index("--maxmemory") + 1] = "600mb"


def _no_maxmemory(objs):
    args = _redis_args(objs)
    del args[args.index("--maxmemory"):args.index("--maxmemory") + 2]


def _queue_over_maxmemory(objs):
    _config_map(objs, "gateway")["data"]["QUEUE_MAX_BYTES"] = str(400 * 1024 * 1024)


def _upload_budget_over_limit(objs):
    _config_map(objs, "gateway")["data"]["UPLOAD_BUDGET_BYTES"] = str(256 * 1024 * 1024)


def _dev_password(objs):
    _redis_secret(objs)["data"]["REDIS_PASSWORD"] = base64.b64encode(b"dev-only-password").decode()


def _password_with_newline(objs):
    _redis_secret(objs)["data"]["REDIS_PASSWORD"] = base64.b64encode(b"0123456789abcdef\n").decode()


def _no_prestop(objs):
    del _container(objs, "gateway")["lifecycle"]


def _short_gateway_grace(objs):
    _pod(objs, "gateway")["terminationGracePeriodSeconds"] = 20


def _long_result_timeout(objs):
    _config_map(objs, "gateway")["data"]["RESULT_TIMEOUT_S"] = "60"


def _short_worker_grace(objs):
    _pod(objs, "worker")["terminationGracePeriodSeconds"] = 25


def _slow_grpc(objs):
    _config_map(objs, "worker")["data"]["GRPC_TIMEOUT_S"] = "10"


def _long_claim_idle(objs):
    _config_map(objs, "worker")["data"]["CLAIM_IDLE_MS"] = "30000"


def _ingress_annotations(objs):
    return policy.get(objs, "Ingress", "gateway")["metadata"]["annotations"]


def _no_issuer(objs):
    del _ingress_annotations(objs)["cert-manager.io/cluster-issuer"]


def _host_without_tls(objs):
    policy.get(objs, "Ingress", "gateway")["spec"]["rules"][0]["host"] = "other.example.com"


def _no_tls(objs):
    del policy.get(objs, "Ingress", "gateway")["spec"]["tls"]


def _no_rate_limit(objs):
    del _ingress_annotations(objs)["nginx.ingress.kubernetes.io/limit-rps"]


def _no_connection_limit(objs):
    _ingress_annotations(objs)["nginx.ingress.kubernetes.io/limit-connections"] = "0"


def _html_504(objs):
    _ingress_annotations(objs)["nginx.ingress.kubernetes.io/custom-http-errors"] = "502,503"


def _error_without_code(objs):
    _ingress_annotations(objs)["nginx.ingress.kubernetes.io/custom-http-errors"] = "418,502,503,504"


def _intercepts_gateway_errors(objs):
    del _ingress_annotations(objs)["nginx.ingress.kubernetes.io/disable-proxy-intercept-errors"]


def _no_default_backend(objs):
    _ingress_annotations(objs)["nginx.ingress.kubernetes.io/default-backend"] = "gateway-error"


def _errors_backend_404(objs):
    env = _container(objs, "gateway-errors", "errors")["env"]
    next(v for v in env if v["name"] == "ERRORS_DEFAULT_STATUS")["value"] = "404"


def _errors_backend_unreachable(objs):
    objs.remove(policy.get(objs, "NetworkPolicy", "gateway-errors"))


BROKEN = [
    (_drop_limits, "Deployment/worker container worker: no limits.cpu"),
    (_drop_init_requests, "container seed-model: no requests.cpu"),
    (_drop_readiness, "container gateway serves but has no readinessProbe"),
    (_probe_wrong_port, "livenessProbe port http is not a declared container port"),
    (_writable_root, "container tfserving: root filesystem is writable"),
    (_root_user, "container redis: runAsNonRoot is not true"),
    (_escalation, "container trainer: allowPrivilegeEscalation is not false"),
    (_token, "Deployment/gateway mounts a service account token it does not need"),
    (_latest_tag, "image tensorflow/serving:latest is not pinned"),
    (_untagged, "image redis is not pinned"),
    (_mixed_versions, "the stack's images are at different versions"),
    (_trainer_reaches_redis, "redis accepts connections from ['pod:gateway', 'pod:trainer',"),
    (_gateway_reaches_tfserving, "tfserving accepts connections from ['pod:gateway', 'pod:worker']"),
    (_no_default_deny, "trainer accepts connections from ['any']"),
    (_service_selector_typo, "Service/tfserving selects 0 workloads"),
    (_service_wrong_target, "Service/gateway port 5000: target 8080 is no container port"),
    (_ingress_wrong_port, "Service gateway has no port 80"),
    (_no_web_page, "no Ingress routes /static/ to the gateway Service"),
    (_model_name, "tfserving --model_name is cifar, expected cifar10"),
    (_export_base, "trainer --export-base is /models/cifar, but TF Serving reads /models/cifar10"),
    (_trainer_other_claim, "model volume differs between writer and readers"),
    (_worker_address, "worker TFSERVING_ADDRESS tfserving:8501 is not the tfserving Service's gRPC"),
    (_password_after_url, "gateway REDIS_URL does not take its password from the Secret"),
    (_missing_secret_key, "has no key password (env REDIS_PASSWORD)"),
    (_no_gpu, "trainer GPU requests/limits are ['None', 'None'], expected 1 and 1"),
    (_no_toleration, "trainer does not tolerate the nvidia.com/gpu taint"),
    (_worker_replicas, "Deployment/worker sets replicas"),
    (_no_pdb, "no PodDisruptionBudget covers Deployment/gateway"),
    (_body_size, "proxy-body-size 1m is below MAX_UPLOAD_BYTES"),
    (_default_namespace, "Service/redis is not in namespace cifar10"),
    (_requirepass_in_argv, "container redis command/args: secret REDIS_PASSWORD is expanded into argv"),
    (_requirepass_in_argv, "container redis command/args: a password flag of redis in argv"),
    (_redis_cli_password_in_argv, "container redis readinessProbe: a password flag of redis in argv"),
    (_secret_expanded_in_args, "container worker command/args: secret REDIS_PASSWORD is expanded"),
    (_no_requirepass, "redis is started without requirepass: it accepts any client"),
    (_password_on_disk, "redis writes its password to /run/redis/redis.conf, not on a memory-backed"),
    (_no_umask, "redis writes its password file without umask 077"),
    (_evicting, "redis --maxmemory-policy is allkeys-lru, expected noeviction"),
    (_no_aof_fsync, "redis --appendfsync is no, expected everysec"),
    (_maxmemory_over_limit, "expected gateway QUEUE_MAX_BYTES 268435456 < redis maxmemory 600mb < "
                            "redis memory limit 512Mi"),
    (_no_maxmemory, "redis has no --maxmemory"),
    (_queue_over_maxmemory, "expected gateway QUEUE_MAX_BYTES 419430400 < redis maxmemory 384mb"),
    (_upload_budget_over_limit, "gateway needs 640 MiB for WEB_CONCURRENCY x (UPLOAD_BUDGET_BYTES + base), over"),
    (_dev_password, "ships the development password dev-only-password"),
    (_password_with_newline, "REDIS_PASSWORD has characters that are not URL-safe"),
    (_no_prestop, "gateway has no preStop sleep"),
    (_short_gateway_grace, "gateway terminationGracePeriodSeconds 20 < preStop 5 + graceful_timeout 15"),
    (_long_result_timeout, "gateway terminationGracePeriodSeconds 30 < preStop 5 + graceful_timeout 65"),
    (_short_worker_grace, "worker terminationGracePeriodSeconds 25 < slowest batch 20.35 s"),
    (_slow_grpc, "worker terminationGracePeriodSeconds 45 < slowest batch 40.35 s"),
    (_long_claim_idle, "worker CLAIM_IDLE_MS 30000 is not shorter than the gateway's RESULT_TIMEOUT_S 10"),
    (_no_issuer, "Ingress/gateway has no cert-manager.io/cluster-issuer annotation"),
    (_host_without_tls, "Ingress/gateway host other.example.com is not in a tls entry"),
    (_no_tls, "Ingress/gateway has no tls entry with a secretName"),
    (_no_rate_limit, "Ingress/gateway has no per-client limit-rps"),
    (_no_connection_limit, "Ingress/gateway has no per-client limit-connections (got '0')"),
    (_html_504, "custom-http-errors [502, 503] lacks [504]"),
    (_error_without_code, "custom-http-errors [418] have no code in gateway.errors.CODES"),
    (_intercepts_gateway_errors, "intercepts the gateway's own errors"),
    (_no_default_backend, "default-backend gateway-error is no Service"),
    (_errors_backend_404, "Deployment/gateway-errors does not answer 503 without X-Code"),
    (_errors_backend_unreachable, "Deployment/gateway-errors accepts connections from nobody"),
]


@pytest.mark.parametrize("breakage,expected", BROKEN, ids=[b.__name__[1:] for b, _ in BROKEN])
def test_broken_copy_is_caught(breakage, expected):
    objs = copy.deepcopy(list(rendered("k8s/overlays/production")))
    breakage(objs)
    found = check(objs, gpu=True)
    assert any(expected in v for v in found), found


def test_gpu_in_cpu_overlay_is_caught():
    objs = copy.deepcopy(list(rendered("k8s/overlays/production")))
    assert "trainer container trainer asks for a GPU" in " ".join(check(objs, gpu=False))


def test_broken_overlay_rendered_by_kustomize_is_caught(tmp_path):
    """End to end through the real kustomize: an overlay that lets the trainer reach Redis."""
    (tmp_path / "kustomization.yaml").write_text(textwrap.dedent(f"""\
        resources:
          - {os.path.relpath(render_root() / "k8s/overlays/production", tmp_path)}
        patches:
          - target: {{kind: NetworkPolicy, name: redis}}
            patch: |-
              - op: add
                path: /spec/ingress/0/from/-
                value: {{podSelector: {{matchLabels: {{app: trainer}}}}}}
        """))
    found = check(kustomize(tmp_path), gpu=True)
    assert found == ["redis accepts connections from ['pod:gateway', 'pod:trainer', "
                     "'pod:worker'], expected ['pod:gateway', 'pod:worker']"]


def test_selector_semantics():
    labels = {"app": "worker", "tier": "backend"}
    assert policy.selects({}, labels)
    assert policy.selects({"matchLabels": {"app": "worker"}}, labels)
    assert not policy.selects({"matchLabels": {"app": "gateway"}}, labels)
    assert policy.selects({"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["worker"]},
        {"key": "tier", "operator": "Exists"},
        {"key": "gpu", "operator": "DoesNotExist"}]}, labels)
    assert not policy.selects({"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["worker"]}]}, labels)
