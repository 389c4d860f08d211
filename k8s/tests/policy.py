"""Policy rules over rendered Kubernetes objects.

Each rule takes the rendered objects (and the stack values where it needs them) and returns a
list of violations as sentences; an empty list means the rule holds. test_k8s_policy runs every
rule on every overlay, and on deliberately broken copies to show that the rules can fail.
"""
import base64
import re
from urllib.parse import urlsplit

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# The services the stack is made of, by their `app` label.
GATEWAY, WORKER, REDIS, TFSERVING, TRAINER = "gateway", "worker", "redis", "tfserving", "trainer"
OWN_IMAGES = ("cifar10/gateway", "cifar10/worker", "cifar10/trainer")
GATEWAY_ERRORS = "gateway-errors"
GATEWAY_ENV = ("REDIS_URL", "MAX_UPLOAD_BYTES", "MAX_IMAGES_PER_REQUEST", "RESULT_TIMEOUT_S",
               "QUEUE_MAXLEN", "QUEUE_MAX_BYTES", "UPLOAD_BUDGET_BYTES", "GUNICORN_BIND", "WEB_CONCURRENCY")
WORKER_ENV = ("REDIS_URL", "TFSERVING_ADDRESS", "MODEL_NAME", "MAX_BATCH_SIZE",
              "MAX_BATCH_WAIT_MS", "GRPC_TIMEOUT_S", "GRPC_RETRIES", "CLAIM_IDLE_MS",
              "WORKER_METRICS_PORT")
# The base's development password (k8s/base/kustomization.yaml), refused where dev_secret is off.
DEV_REDIS_PASSWORD = "dev-only-password"
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
# Errors ingress-nginx produces itself that the JSON backend must answer (no pod answered,
# proxy timeout, rate limit).
PROXY_ERRORS = {502, 503, 504}
NGINX = "nginx.ingress.kubernetes.io/"
QUANTITY = re.compile(r"^(\d+(\.\d+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")


# ---- access helpers -------------------------------------------------------------------------

def name(obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def get(objs, kind, obj_name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == obj_name]
    return found[0] if found else None


def pod_template(obj) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def workloads(objs):
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def workload(objs, app):
    """The workload whose pods carry app=<app>."""
    found = [w for w in workloads(objs) if pod_labels(w).get("app") == app]
    assert len(found) == 1, f"expected one workload with app={app}, found {[name(w) for w in found]}"
    return found[0]


def pod_labels(obj) -> dict:
    return pod_template(obj).get("metadata", {}).get("labels", {})


def containers(obj, init=True):
    spec = pod_template(obj)["spec"]
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def container(obj, container_name):
    return next(c for c in containers(obj) if c["name"] == container_name)


def container_env(objs, obj, c) -> dict:
    """The container's environment as the kubelet builds it: envFrom first, then env.

    Values from secrets stay symbolic ("secret.NAME.KEY"); $(VAR) references are expanded
    from variables defined earlier in env, as Kubernetes does.
    """
    env = {}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        found = get(objs, kind, ref["name"])
        env.update((found or {}).get("data", {}))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)",
                                      lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"secret.{ref['name']}.{ref['key']}"
        else:
            env[var["name"]] = "fieldRef"
    return env


def flag(args, option) -> str | None:
    """The value of `--option=value` or `--option value` in an argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and i + 1 < len(args):
            return args[i + 1]
    return None


def container_port(c, port) -> int | None:
    """A probe's or Service's port (number or name) as a container port number, if declared."""
    for p in c.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def selects(selector, labels) -> bool:
    """Label selector semantics (matchLabels and matchExpressions)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# ---- rules ----------------------------------------------------------------------------------

def check_namespace(objs, namespace):
    return [f"{name(o)} is not in namespace {namespace}" for o in objs
            if o["kind"] != "Namespace" and o["metadata"].get("namespace") != namespace]


def check_resources(objs):
    """Every container, init containers too, requests and limits cpu and memory."""
    out = []
    for w in workloads(objs):
        for c in containers(w):
            res = c.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    value = str(res.get(section, {}).get(resource, ""))
                    if not QUANTITY.match(value):
                        out.append(f"{name(w)} container {c['name']}: no {section}.{resource}")
    return out


def check_probes(objs):
    """A container that listens has readiness and liveness probes, on ports it declares."""
    out = []
    for w in workloads(objs):
        for c in containers(w, init=False):
            if not c.get("ports"):
                continue
            for probe_kind in ("readinessProbe", "livenessProbe"):
                probe = c.get(probe_kind)
                if not probe:
                    out.append(f"{name(w)} container {c['name']} serves but has no {probe_kind}")
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if action and container_port(c, action["port"]) is None:
                    out.append(f"{name(w)} container {c['name']}: {probe_kind} port "
                               f"{action['port']} is not a declared container port")
    return out


def check_security(objs):
    """Non-root, no privilege escalation, all capabilities dropped, read-only root filesystem, no
    service account token (no pod of the stack calls the Kubernetes API)."""
    out = []
    for w in workloads(objs):
        spec = pod_template(w)["spec"]
        pod_sc = spec.get("securityContext", {})
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field):
                out.append(f"{name(w)} uses {field}")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            out.append(f"{name(w)} mounts a hostPath")
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{name(w)} mounts a service account token it does not need")
        for c in containers(w):
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{name(w)} container {c['name']}"
            if sc.get("runAsNonRoot") is not True:
                out.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser") == 0:
                out.append(f"{where}: runs as uid 0")
            if sc.get("privileged"):
                out.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{where}: root filesystem is writable")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                out.append(f"{where}: capabilities are not all dropped")
            if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
                out.append(f"{where}: no seccomp profile")
    return out


def image_tag(image) -> str | None:
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def check_images(objs):
    """Every image pinned to an exact tag (or digest); ours all at one version."""
    out, own_tags = [], set()
    for w in workloads(objs):
        for c in containers(w):
            image, tag = c["image"], image_tag(c["image"])
            if tag is None or tag == "latest" or not re.search(r"\d+\.\d+\.\d+|sha256:", tag):
                out.append(f"{name(w)} container {c['name']}: image {image} is not pinned "
                           "to an exact version")
            if image.startswith(OWN_IMAGES) and tag:
                own_tags.add(tag.removesuffix("-gpu"))
            if c.get("imagePullPolicy") == "Always" and tag and "sha256:" not in tag:
                out.append(f"{name(w)} container {c['name']}: imagePullPolicy Always on a tag")
    if len(own_tags) > 1:
        out.append(f"the stack's images are at different versions: {sorted(own_tags)}")
    return out


def check_references(objs):
    """ConfigMaps, Secrets, PVCs and volumes that pods name exist (kustomize hashes names)."""
    out = []
    for w in workloads(objs):
        spec = pod_template(w)["spec"]
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in spec.get("volumes", [])} | claims
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v and not get(
                    objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]):
                out.append(f"{name(w)}: PVC {v['persistentVolumeClaim']['claimName']} is missing")
            if "configMap" in v and not get(objs, "ConfigMap", v["configMap"]["name"]):
                out.append(f"{name(w)}: ConfigMap {v['configMap']['name']} is missing")
            if "secret" in v and not get(objs, "Secret", v["secret"]["secretName"]):
                out.append(f"{name(w)}: Secret {v['secret']['secretName']} is missing")
        for c in containers(w):
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    out.append(f"{name(w)} container {c['name']}: mounts undefined volume {m['name']}")
            for source in c.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source and not get(objs, kind, source[key]["name"]):
                        out.append(f"{name(w)} container {c['name']}: {kind} "
                                   f"{source[key]['name']} is missing")
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef") or var.get(
                    "valueFrom", {}).get("configMapKeyRef")
                if not ref:
                    continue
                kind = "Secret" if "secretKeyRef" in var["valueFrom"] else "ConfigMap"
                found = get(objs, kind, ref["name"])
                keys = set((found or {}).get("data", {})) | set((found or {}).get("stringData", {}))
                if ref["key"] not in keys:
                    out.append(f"{name(w)} container {c['name']}: {kind} {ref['name']} has no "
                               f"key {ref['key']} (env {var['name']})")
    for ta in of_kind(objs, "TriggerAuthentication"):
        for ref in ta["spec"].get("secretTargetRef", []):
            secret = get(objs, "Secret", ref["name"])
            if not secret or ref["key"] not in secret.get("data", {}):
                out.append(f"{name(ta)}: Secret {ref['name']} with key {ref['key']} is missing")
    return out


def check_services(objs):
    """Each Service selects exactly one workload's pods, and its ports exist on them."""
    out = []
    for svc in of_kind(objs, "Service"):
        matches = [w for w in workloads(objs) if selects({"matchLabels": svc["spec"]["selector"]},
                                                         pod_labels(w))]
        if len(matches) != 1:
            out.append(f"{name(svc)} selects {len(matches)} workloads, not 1")
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(container_port(c, target) for c in containers(matches[0], init=False)):
                out.append(f"{name(svc)} port {port['port']}: target {target} is no container "
                           f"port of {name(matches[0])}")
    for sts in of_kind(objs, "StatefulSet"):
        if not get(objs, "Service", sts["spec"]["serviceName"]):
            out.append(f"{name(sts)}: serviceName {sts['spec']['serviceName']} does not exist")
    return out


def service_port(objs, svc_name, port) -> bool:
    svc = get(objs, "Service", svc_name)
    return bool(svc) and any(port in (p["port"], p.get("name")) for p in svc["spec"]["ports"])


def check_ingress(objs):
    """An Ingress routes POST /predict, the web page (/ and /static/) and GET /model to a gateway
    Service port that exists."""
    out, routes = [], []
    for ing in of_kind(objs, "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]
                port = backend["port"].get("number", backend["port"].get("name"))
                if not service_port(objs, backend["name"], port):
                    out.append(f"{name(ing)} path {path['path']}: Service {backend['name']} "
                               f"has no port {port}")
                routes.append((path["path"], backend["name"]))
    for path in ("/predict", "/", "/static/", "/model"):
        if (path, GATEWAY) not in routes:
            out.append(f"no Ingress routes {path} to the gateway Service")
    return out


def check_disruption_and_scaling(objs):
    """PDBs cover gateway and worker; the worker is autoscaled and leaves replicas to it."""
    out = []
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for app in (GATEWAY, WORKER):
        w = workload(objs, app)
        if not any(selects(p["spec"]["selector"], pod_labels(w)) for p in pdbs):
            out.append(f"no PodDisruptionBudget covers {name(w)}")
    worker = workload(objs, WORKER)
    targets = [h["spec"]["scaleTargetRef"] for h in of_kind(objs, "HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"] for s in of_kind(objs, "ScaledObject")]
    matching = [t for t in targets if t["name"] == worker["metadata"]["name"]
                and t.get("kind", "Deployment") == worker["kind"]]
    if len(matching) != 1:
        out.append(f"{name(worker)} has {len(matching)} autoscalers, not 1")
    if "replicas" in worker["spec"]:
        out.append(f"{name(worker)} sets replicas, which `kubectl apply` would reset under the HPA")
    return out


def ingress_sources(objs, target) -> set[str]:
    """Who may open connections to the target's pods under the NetworkPolicies.

    "pod:<app>" for workloads in the namespace, "ns:<selector>" for other namespaces,
    "any" where a rule (or the lack of any policy) lets everyone in.
    """
    labels = pod_labels(target)
    policies = [p for p in of_kind(objs, "NetworkPolicy")
                if selects(p["spec"]["podSelector"], labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return {"any"}
    sources = set()
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers:
                sources.add("any")
            for peer in peers or []:
                if "ipBlock" in peer:
                    sources.add("any")
                elif "namespaceSelector" in peer:
                    sources.add("ns:" + ",".join(
                        f"{k}={v}" for k, v in sorted(
                            peer["namespaceSelector"].get("matchLabels", {}).items())))
                else:
                    sources |= {f"pod:{pod_labels(w).get('app')}" for w in workloads(objs)
                                if selects(peer["podSelector"], pod_labels(w))}
    return sources


def check_network_policies(objs, external_redis_clients=()):
    """Only gateway and worker reach Redis; only the worker reaches TF Serving; others denied."""
    out = []
    expected = {
        REDIS: {"pod:gateway", "pod:worker", *external_redis_clients},
        TFSERVING: {"pod:worker"},
        TRAINER: set(),
    }
    for app, allowed in expected.items():
        got = ingress_sources(objs, workload(objs, app))
        if got != allowed:
            out.append(f"{app} accepts connections from {sorted(got)}, expected {sorted(allowed)}")
    default_deny = [p for p in of_kind(objs, "NetworkPolicy")
                    if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
                    and "Ingress" in p["spec"].get("policyTypes", [])]
    if not default_deny:
        out.append("no default-deny ingress NetworkPolicy for the namespace")
    return out


def check_stack_values(objs, stack):
    """Names, ports and paths agree across TF Serving, worker, gateway, trainer and stack.env."""
    out = []
    model, grpc_port = stack["MODEL_NAME"], int(stack["TFSERVING_GRPC_PORT"])
    base_path = f"/models/{model}"

    tfs = workload(objs, TFSERVING)
    serving = container(tfs, "tfserving")
    args = serving.get("command", []) + serving.get("args", [])
    wanted = {"--model_name": model, "--model_base_path": base_path,
              "--port": str(grpc_port), "--rest_api_port": stack["TFSERVING_REST_PORT"]}
    for option, value in wanted.items():
        if flag(args, option) != value:
            out.append(f"tfserving {option} is {flag(args, option)}, expected {value}")
    for port in (grpc_port, int(stack["TFSERVING_REST_PORT"])):
        if container_port(serving, port) is None or not service_port(objs, TFSERVING, port):
            out.append(f"tfserving port {port} is not both a container and a Service port")
    for probe in ("readinessProbe", "startupProbe"):
        path = serving.get(probe, {}).get("httpGet", {}).get("path")
        if path != f"/v1/models/{model}":
            out.append(f"tfserving {probe} checks {path}, not the model /v1/models/{model}")

    trainer = workload(objs, TRAINER)
    train = container(trainer, "trainer")
    if flag(train["args"], "--export-base") != base_path:
        out.append(f"trainer --export-base is {flag(train['args'], '--export-base')}, "
                   f"but TF Serving reads {base_path}")
    # The trainer writes and TF Serving reads the same claim, mounted at the same place.
    claim_mounts = {}
    for w, c in ((tfs, serving), (trainer, train), (tfs, container(tfs, "seed-model"))):
        vols = {v["name"]: v for v in pod_template(w)["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            claim = vols.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
            if claim and base_path.startswith(m["mountPath"].rstrip("/") + "/"):
                claim_mounts[c["name"]] = (claim, m["mountPath"])
    if len(claim_mounts) != 3 or len(set(claim_mounts.values())) != 1:
        out.append(f"model volume differs between writer and readers: {claim_mounts}")

    worker = workload(objs, WORKER)
    wenv = container_env(objs, worker, container(worker, "worker"))
    out += [f"worker lacks env {k}" for k in WORKER_ENV if k not in wenv]
    if wenv.get("MODEL_NAME") != model:
        out.append(f"worker MODEL_NAME is {wenv.get('MODEL_NAME')}, TF Serving serves {model}")
    host, _, port = wenv.get("TFSERVING_ADDRESS", "").rpartition(":")
    if host != TFSERVING or port != str(grpc_port) or not service_port(objs, host, grpc_port):
        out.append(f"worker TFSERVING_ADDRESS {wenv.get('TFSERVING_ADDRESS')} is not the "
                   f"tfserving Service's gRPC port {grpc_port}")
    metrics = wenv.get("WORKER_METRICS_PORT", "")
    if metrics != stack["WORKER_METRICS_PORT"] or container_port(
            container(worker, "worker"), int(metrics or 0)) is None:
        out.append(f"worker metrics port {metrics} is not its container port "
                   f"{stack['WORKER_METRICS_PORT']}")

    gateway = workload(objs, GATEWAY)
    genv = container_env(objs, gateway, container(gateway, "gateway"))
    out += [f"gateway lacks env {k}" for k in GATEWAY_ENV if k not in genv]
    bind_port = genv.get("GUNICORN_BIND", "").rpartition(":")[2]
    if bind_port != stack["GATEWAY_PORT"] or container_port(
            container(gateway, "gateway"), int(bind_port or 0)) is None:
        out.append(f"gateway binds port {bind_port}, expected container port "
                   f"{stack['GATEWAY_PORT']}")

    redis_port = int(stack["REDIS_PORT"])
    if container_port(container(workload(objs, REDIS), "redis"), redis_port) is None \
            or not service_port(objs, REDIS, redis_port):
        out.append(f"redis does not listen on {redis_port} behind its Service")
    for app, env, c in ((GATEWAY, genv, container(gateway, "gateway")),
                        (WORKER, wenv, container(worker, "worker"))):
        url = urlsplit(env.get("REDIS_URL", ""))
        if url.hostname != REDIS or url.port != redis_port:
            out.append(f"{app} REDIS_URL points at {url.hostname}:{url.port}, not redis:{redis_port}")
        if not (url.password or "").startswith("secret."):
            out.append(f"{app} REDIS_URL does not take its password from the Secret "
                       "(REDIS_PASSWORD must be defined before REDIS_URL)")

    max_upload = int(genv.get("MAX_UPLOAD_BYTES", 0))
    for ing in of_kind(objs, "Ingress"):
        limit = ing["metadata"].get("annotations", {}).get(
            "nginx.ingress.kubernetes.io/proxy-body-size")
        if limit and _bytes(limit) < max_upload:
            out.append(f"{name(ing)} proxy-body-size {limit} is below MAX_UPLOAD_BYTES {max_upload}")

    for so in of_kind(objs, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            meta = trigger["metadata"]
            if meta.get("stream") != stack["JOB_STREAM"] or meta.get(
                    "consumerGroup") != stack["JOB_GROUP"]:
                out.append(f"{name(so)} watches {meta.get('stream')}/{meta.get('consumerGroup')},"
                           f" the worker reads {stack['JOB_STREAM']}/{stack['JOB_GROUP']}")
            if not meta.get("address", "").startswith(f"{REDIS}."):
                out.append(f"{name(so)} address {meta.get('address')} is not the redis Service")
    return out


def _bytes(size: str) -> int:
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    size = size.strip().lower()
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def check_gpu(objs, gpu: bool):
    """The GPU overlay's trainer asks for one GPU and can land on GPU nodes; CPU ones ask none."""
    out = []
    trainer = workload(objs, TRAINER)
    spec = pod_template(trainer)["spec"]
    train = container(trainer, "trainer")
    res = train.get("resources", {})
    asked = [str(res.get(s, {}).get("nvidia.com/gpu")) for s in ("requests", "limits")]
    if gpu:
        if asked != ["1", "1"]:
            out.append(f"trainer GPU requests/limits are {asked}, expected 1 and 1")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            out.append("trainer does not tolerate the nvidia.com/gpu taint")
        if not spec.get("nodeSelector") and not spec.get("affinity"):
            out.append("trainer is not steered to GPU nodes (nodeSelector/affinity)")
        if not image_tag(train["image"]).endswith("-gpu"):
            out.append(f"trainer image {train['image']} is not the GPU build")
    for w in workloads(objs):
        for c in containers(w):
            if w is trainer and c is train and gpu:
                continue
            if any("nvidia.com/gpu" in c.get("resources", {}).get(s, {})
                   for s in ("requests", "limits")):
                out.append(f"{name(w)} container {c['name']} asks for a GPU")
    return out


# ---- Redis: secret, argv, memory -------------------------------------------------------------

def redis_bytes(size: str) -> int:
    """A Redis memory size: 1k = 1000, 1kb = 1024 (and m/mb, g/gb), case-insensitive."""
    m = re.fullmatch(r"(\d+)([kmg]b?)?", str(size).strip().lower())
    if not m:
        raise ValueError(f"not a Redis memory size: {size!r}")
    unit = m.group(2) or ""
    scale = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9,
             "kb": 2 ** 10, "mb": 2 ** 20, "gb": 2 ** 30}[unit]
    return int(m.group(1)) * scale


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (512Mi, 1G, 1e9 not supported) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity).strip())
    if not m:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    scale = {None: 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
             "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}[m.group(2)]
    return int(m.group(1)) * scale


def secret_vars(c) -> set[str]:
    """Names of the container's environment variables that come from Secrets."""
    return {v["name"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}


def argv_lists(c):
    """Every argument list the container's processes are started with: its command and args,
    and the exec commands of its probes and lifecycle hooks."""
    yield "command/args", c.get("command", []) + c.get("args", [])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if "exec" in c.get(probe, {}):
            yield probe, c[probe]["exec"]["command"]
    for hook, handler in c.get("lifecycle", {}).items():
        if "exec" in handler:
            yield hook, handler["exec"]["command"]


def check_secrets_not_in_argv(objs):
    """No secret reaches a process's argv (visible in `ps` on the node and in the pod spec):
    no $(VAR) of a secret variable, which the kubelet expands into the arguments, and no
    password flag of redis-server or redis-cli."""
    out = []
    for w in workloads(objs):
        for c in containers(w):
            secrets = secret_vars(c)
            for where, argv in argv_lists(c):
                for arg in argv:
                    for var in re.findall(r"\$\((\w+)\)", arg):
                        if var in secrets:
                            out.append(f"{name(w)} container {c['name']} {where}: secret {var} "
                                       "is expanded into argv")
                    if (arg == "--requirepass" or re.search(r"--requirepass\s", arg)
                            or re.search(r"redis-cli\b[^|;&\n]*\s(-a|--pass)\s", arg)
                            or (argv[0].endswith("redis-cli") and arg in ("-a", "--pass"))):
                        out.append(f"{name(w)} container {c['name']} {where}: a password flag "
                                   "of redis in argv")
    return out


def redis_container(objs):
    return container(workload(objs, REDIS), "redis")


def check_redis(objs):
    """Redis asks for a password, read from a config file on a memory volume written with umask
    077; it persists with AOF every second; it has maxmemory with noeviction, above the gateway's
    QUEUE_MAX_BYTES and below its own memory limit."""
    out = []
    sts = workload(objs, REDIS)
    c = redis_container(objs)
    argv = c.get("command", []) + c.get("args", [])
    script = next((a for a in argv if "requirepass" in a), None)
    if script is None:
        out.append("redis is started without requirepass: it accepts any client")
    else:
        written = re.search(r"requirepass[^>]*>\s*(\S+)", script)
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod_template(sts)["spec"].get("volumes", [])}
        path = written.group(1) if written else ""
        mount = next((mounts[p] for p in mounts if path.startswith(p + "/")), None)
        if mount is None or vols.get(mount, {}).get("emptyDir", {}).get("medium") != "Memory":
            out.append(f"redis writes its password to {path or '?'}, not on a memory-backed emptyDir")
        if "umask 077" not in script:
            out.append("redis writes its password file without umask 077")
        if f"redis-server {path}" not in script:
            out.append(f"redis-server is not started with the config file {path}")
    wanted = {"--appendonly": "yes", "--appendfsync": "everysec", "--maxmemory-policy": "noeviction"}
    for option, value in wanted.items():
        if flag(argv, option) != value:
            out.append(f"redis {option} is {flag(argv, option)}, expected {value}")
    maxmemory = flag(argv, "--maxmemory")
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    gateway = workload(objs, GATEWAY)
    queue_bytes = container_env(objs, gateway, container(gateway, "gateway")).get("QUEUE_MAX_BYTES")
    if not maxmemory:
        out.append("redis has no --maxmemory: a full queue would take the node's memory")
    elif not limit or not queue_bytes:
        out.append(f"redis memory limit {limit} or gateway QUEUE_MAX_BYTES {queue_bytes} missing")
    elif not int(queue_bytes) < redis_bytes(maxmemory) < quantity_bytes(limit):
        out.append(f"expected gateway QUEUE_MAX_BYTES {queue_bytes} < redis maxmemory {maxmemory} "
                   f"< redis memory limit {limit}")
    return out


# A gunicorn process before any upload (measured: 39 MiB) plus slack for allocator and threads.
GATEWAY_PROCESS_BASE_BYTES = 64 * 2**20


def check_gateway_memory(objs):
    """Every gateway process may hold UPLOAD_BUDGET_BYTES of bodies (each read once): the pod's
    memory limit must cover WEB_CONCURRENCY of them with their base."""
    gateway = workload(objs, GATEWAY)
    c = container(gateway, "gateway")
    env = container_env(objs, gateway, c)
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if not env.get("UPLOAD_BUDGET_BYTES") or not env.get("WEB_CONCURRENCY") or not limit:
        return [f"gateway UPLOAD_BUDGET_BYTES, WEB_CONCURRENCY or memory limit missing ({limit})"]
    needed = int(env["WEB_CONCURRENCY"]) * (int(env["UPLOAD_BUDGET_BYTES"]) + GATEWAY_PROCESS_BASE_BYTES)
    if needed > quantity_bytes(limit):
        return [f"gateway needs {needed >> 20} MiB for WEB_CONCURRENCY x (UPLOAD_BUDGET_BYTES + base), "
                f"over its memory limit {limit}"]
    return []


def check_redis_secret(objs, dev_secret: bool):
    """The password is URL-safe (it goes into REDIS_URL); outside development overlays it is not
    the base's development default and has at least 16 characters."""
    out = []
    c = redis_container(objs)
    ref = next((v["valueFrom"]["secretKeyRef"] for v in c.get("env", [])
                if v["name"] == "REDIS_PASSWORD" and "secretKeyRef" in v.get("valueFrom", {})), None)
    secret = get(objs, "Secret", ref["name"]) if ref else None
    if not secret or ref["key"] not in secret.get("data", {}):
        return ["redis does not take REDIS_PASSWORD from a Secret"]
    password = base64.b64decode(secret["data"][ref["key"]]).decode()
    if not URL_SAFE.fullmatch(password):
        out.append(f"{name(secret)} {ref['key']} has characters that are not URL-safe "
                   "(it goes into REDIS_URL; a trailing newline?)")
    if not dev_secret:
        if password == DEV_REDIS_PASSWORD:
            out.append(f"{name(secret)} ships the development password {DEV_REDIS_PASSWORD}")
        elif len(password) < 16:
            out.append(f"{name(secret)} {ref['key']} is shorter than 16 characters")
    return out


# ---- shutdown -------------------------------------------------------------------------------

def prestop_sleep_s(c) -> float:
    """Seconds the container's preStop hook sleeps (exec `sleep N` or the sleep action), else 0."""
    hook = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return float(command[1])
    return 0.0


def check_shutdown(objs, timings):
    """Pods get the time they need to stop cleanly. Gateway: its preStop sleep (endpoints removed
    before SIGTERM) plus gunicorn's graceful_timeout plus a margin fit in the grace period.
    Worker: the slowest batch (every Predict attempt timing out, plus backoff) plus a margin fits
    in the grace period, and CLAIM_IDLE_MS is shorter than the gateway's RESULT_TIMEOUT_S, so a
    dead worker's jobs are taken over while their callers still wait (a live worker keeps its
    claims fresh, so a slow batch is not taken over). `timings` computes the services' times
    from their environment."""
    out = []
    gateway = workload(objs, GATEWAY)
    gw = container(gateway, "gateway")
    grace = pod_template(gateway)["spec"].get("terminationGracePeriodSeconds", 30)
    sleep_s = prestop_sleep_s(gw)
    graceful = timings.gateway(container_env(objs, gateway, gw))["graceful_timeout_s"]
    if sleep_s <= 0:
        out.append("gateway has no preStop sleep: SIGTERM may come before its endpoint is removed")
    if grace < sleep_s + graceful + timings.GATEWAY_MARGIN_S:
        out.append(f"gateway terminationGracePeriodSeconds {grace} < preStop {sleep_s:g} + "
                   f"graceful_timeout {graceful:g} + margin {timings.GATEWAY_MARGIN_S}")

    worker = workload(objs, WORKER)
    wk = container(worker, "worker")
    grace = pod_template(worker)["spec"].get("terminationGracePeriodSeconds", 30)
    batch = timings.worker(container_env(objs, worker, wk))
    if grace < batch["slowest_batch_s"] + timings.WORKER_MARGIN_S:
        out.append(f"worker terminationGracePeriodSeconds {grace} < slowest batch "
                   f"{batch['slowest_batch_s']:g} s + margin {timings.WORKER_MARGIN_S}")
    result_timeout_s = float(container_env(objs, gateway, gw)["RESULT_TIMEOUT_S"])
    if not batch["claim_idle_ms"] / 1000 < result_timeout_s:
        out.append(f"worker CLAIM_IDLE_MS {batch['claim_idle_ms']} is not shorter than the gateway's "
                   f"RESULT_TIMEOUT_S {result_timeout_s:g}: a dead worker's jobs would be retried for nobody")
    return out


# ---- the edge: TLS, rate limits, JSON errors ------------------------------------------------

def error_codes() -> dict:
    """gateway.errors.CODES: the statuses the JSON error backend has a code for."""
    from gateway import errors
    return errors.CODES


def check_edge(objs, tls: bool):
    """The gateway's Ingress: HTTPS from cert-manager for every host (where tls), per-client rate
    limits, and JSON errors: the codes nginx produces go to the gateway-errors backend (which
    has a code for each, and answers 503 when ingress-nginx hands it /predict because no gateway
    pod is ready), the gateway's own errors pass through, and the backend can be reached."""
    out = []
    ing = get(objs, "Ingress", GATEWAY)
    if not ing:
        return ["no Ingress gateway"]
    ann = ing["metadata"].get("annotations", {})
    if tls:
        if not ann.get("cert-manager.io/cluster-issuer"):
            out.append(f"{name(ing)} has no cert-manager.io/cluster-issuer annotation")
        entries = ing["spec"].get("tls", [])
        covered = {h for t in entries if t.get("secretName") for h in t.get("hosts", [])}
        if not entries or any(not t.get("secretName") for t in entries):
            out.append(f"{name(ing)} has no tls entry with a secretName")
        for rule in ing["spec"].get("rules", []):
            if rule.get("host") not in covered:
                out.append(f"{name(ing)} host {rule.get('host')} is not in a tls entry "
                           "(cert-manager issues certificates for the tls hosts)")
    for limit in ("limit-rps", "limit-connections"):
        value = str(ann.get(NGINX + limit, ""))
        if not value.isdigit() or int(value) < 1:
            out.append(f"{name(ing)} has no per-client {limit} (got {value!r})")
    codes = set()
    for code in str(ann.get(NGINX + "custom-http-errors", "")).split(","):
        if code.strip().isdigit():
            codes.add(int(code))
    if not PROXY_ERRORS <= codes:
        out.append(f"{name(ing)} custom-http-errors {sorted(codes)} lacks {sorted(PROXY_ERRORS - codes)}")
    unnamed = sorted(codes - set(error_codes()))
    if unnamed:
        out.append(f"{name(ing)} custom-http-errors {unnamed} have no code in gateway.errors.CODES")
    if ann.get(NGINX + "disable-proxy-intercept-errors") != "true":
        out.append(f"{name(ing)} intercepts the gateway's own errors (queue_full, timeout...): "
                   "disable-proxy-intercept-errors is not \"true\"")
    backend = ann.get(NGINX + "default-backend")
    svc = get(objs, "Service", backend) if backend else None
    if not svc:
        out.append(f"{name(ing)} default-backend {backend} is no Service")
        return out
    targets = [w for w in workloads(objs) if selects({"matchLabels": svc["spec"]["selector"]},
                                                     pod_labels(w))]
    if len(targets) != 1:
        out.append(f"{name(svc)} selects {len(targets)} workloads, not 1")
        return out
    w = targets[0]
    c = containers(w, init=False)[0]
    if c.get("command", []) + c.get("args", []) != ["python", "-m", "gateway.errors"]:
        out.append(f"{name(w)} does not run python -m gateway.errors")
    if container_env(objs, w, c).get("ERRORS_DEFAULT_STATUS") != "503":
        out.append(f"{name(w)} does not answer 503 without X-Code (ERRORS_DEFAULT_STATUS), "
                   "which is what ingress-nginx sends it while no gateway pod is ready")
    if not ingress_sources(objs, w):
        out.append(f"{name(w)} accepts connections from nobody: the ingress controller cannot "
                   "reach it")
    return out


def violations(objs, stack, namespace, gpu, keda=False, tls=True, dev_secret=False, timings=None):
    """Every rule's violations for one rendered overlay."""
    if timings is None:
        from k8s.tests import timings
    keda_clients = ("ns:kubernetes.io/metadata.name=keda",) if keda else ()
    return (check_namespace(objs, namespace) + check_resources(objs) + check_probes(objs)
            + check_security(objs) + check_images(objs) + check_references(objs)
            + check_services(objs) + check_ingress(objs) + check_disruption_and_scaling(objs)
            + check_network_policies(objs, keda_clients) + check_stack_values(objs, stack)
            + check_gpu(objs, gpu) + check_secrets_not_in_argv(objs) + check_redis(objs) + check_gateway_memory(objs)
            + check_redis_secret(objs, dev_secret) + check_shutdown(objs, timings)
            + check_edge(objs, tls))
