"""Train on the cluster: Jobs from the `trainer` CronJob template.

The CronJob (k8s/base/trainer.yaml) is suspended and never runs by itself; it holds the pod
template of the deployed overlay (image, GPU, volumes). Each run becomes a Job with a unique
name; the trainer writes the next integer model version into the model volume and TF Serving
picks it up. From the same template:
- `distributed_job`: one run on several GPUs (MirroredStrategy in one pod) or several pods
  (an Indexed Job + a headless Service; MultiWorkerMirroredStrategy, TF_CONFIG built in each
  pod by training.run.distribute from JOB_COMPLETION_INDEX and the pods' DNS names);
- `study_job`: many independent runs (configurations x seeds) as one Indexed Job, index i
  being run i of training.lab.study.study_runs, with a retry budget per index.

Everything here except `Cluster` works on plain dicts and is unit-tested without a cluster.
"""
import copy
import math
import re
import secrets
import sys
import time
from datetime import datetime, timezone

from kubernetes import client, config

TEMPLATE = "trainer"
CONTAINER = "trainer"
CONFIG_LABEL = "cifar10/train-config"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
STUDY_LABEL = "cifar10/study"
# One Job's pods, for its headless Service (set in the template, so it exists before the pods do).
TRAIN_JOB_LABEL = "cifar10/train-job"
# Pods that exchange gradients: the NetworkPolicy trainer-collectives lets them reach each other.
COLLECTIVE_LABEL = "cifar10/collective"
COLLECTIVE_PORT = 12345
GPU = "nvidia.com/gpu"
STUDY_COMMAND = ["python", "-m", "training.lab.study"]
# Reasons a pod can sit in Waiting for good; the Job would otherwise look merely slow.
STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError"}


def job_name(config: str, now: datetime | None = None, suffix: str | None = None, kind: str = "train") -> str:
    """`<kind>-<config>-<UTC time>-<random>`: unique, sortable, a valid DNS label (<= 55, so
    that an Indexed Job's pod hostnames `<name>-<index>` are labels too)."""
    now = now or datetime.now(timezone.utc)
    suffix = suffix or secrets.token_hex(4)  # two jobs in one second must not collide
    slug = re.sub(r"[^a-z0-9]+", "-", config.lower()).strip("-")[:24].strip("-") or "model"
    return f"{kind}-{slug}-{now:%Y%m%d-%H%M%S}-{suffix}"


BACKENDS = ("tensorflow", "jax")
# Under JAX, the run's evaluation and export are a TensorFlow process beside it on the same GPU:
# neither may take the GPU's memory up front.
JAX_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def job_from_cronjob(cronjob: dict, name: str, config: str, epochs: int | None = None,
                     precision: str | None = None, backend: str | None = None) -> dict:
    """The Job manifest for one training run, from the CronJob's jobTemplate.

    Only the trainer's `--config` (and `--epochs`, `--precision`) change; image, resources, GPU
    scheduling and volumes stay as the deployed overlay defines them. `backend` sets
    KERAS_BACKEND; "jax" also runs the image built with BACKEND=jax, tagged `<tag>-jax`
    (training/Dockerfile), as TensorFlow's images carry no JAX.
    """
    template = copy.deepcopy(cronjob["spec"]["jobTemplate"])
    spec = template["spec"]
    containers = spec["template"]["spec"]["containers"]
    trainer = next((c for c in containers if c["name"] == CONTAINER), None)
    if trainer is None:
        raise ValueError(f"CronJob {cronjob['metadata']['name']} has no container {CONTAINER!r}")
    trainer["args"] = _with_option(trainer.get("args", []), "--config", config)
    if epochs is not None:
        trainer["args"] = _with_option(trainer["args"], "--epochs", str(epochs))
    if precision is not None:
        trainer["args"] = _with_option(trainer["args"], "--precision", precision)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        env = {"KERAS_BACKEND": backend, **(JAX_ENV if backend == "jax" else {})}
        trainer["env"] = [e for e in trainer.get("env", []) if e["name"] not in env] + [
            {"name": key, "value": value} for key, value in env.items()]
        if backend == "jax":
            trainer["image"] = jax_image(trainer["image"])

    labels = {**template.get("metadata", {}).get("labels", {}), CONFIG_LABEL: _label_value(config)}
    pod_meta = spec["template"].setdefault("metadata", {})
    pod_meta["labels"] = {**pod_meta.get("labels", {}), CONFIG_LABEL: labels[CONFIG_LABEL]}
    metadata = {
        "name": name,
        "labels": labels,
        # What `kubectl create job --from=cronjob/...` sets: made by hand, not by the schedule.
        "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
    }
    if cronjob["metadata"].get("namespace"):
        metadata["namespace"] = cronjob["metadata"]["namespace"]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def _trainer(job: dict) -> dict:
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER)


def _option(args: list[str], option: str) -> str | None:
    return args[args.index(option) + 1] if option in args and args.index(option) + 1 < len(args) else None


def _scale_quantity(value, factor: int) -> str:
    """A CPU or memory quantity times `factor` ("2" x 4 = "8", "4Gi" x 4 = "16Gi", "500m" x 4 = "2")."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value)).groups()
    if unit == "m" and float(number) * factor % 1000 == 0:
        return str(int(float(number) * factor // 1000))
    scaled = float(number) * factor
    return f"{int(scaled) if scaled == int(scaled) else scaled}{unit}"


def distributed_job(cronjob: dict, name: str, config: str, gpus: int = 1, nodes: int = 1,
                    epochs: int | None = None, precision: str | None = None, scale_batch: bool = False,
                    port: int = COLLECTIVE_PORT, backend: str | None = None) -> list[dict]:
    """One training run on `gpus` GPUs in each of `nodes` pods: [Job] for one pod, [Job, headless
    Service] for several. Every pod asks for `gpus` GPUs (and the template's CPU and memory times
    `gpus`); with several pods the Job is Indexed (completions = parallelism = nodes, so all run
    together), each pod's hostname is `<name>-<index>` under the Service `<name>`, and the trainer
    builds TF_CONFIG from that (training.run.distribute). All pods share the run directory
    /runs/<name>, which only worker 0 writes. A dead worker fails the others' collectives, so the
    backoff budget is the template's times `nodes`: every restart of the group may cost one
    failure per pod. With scale_batch each GPU gets the configuration's batch (global batch x
    GPUs, learning rate scaled: training.run.distribute.scaled_for_replicas); without, the
    configuration's batch is split over the GPUs and the run is the single-GPU run."""
    if gpus < 1 or nodes < 1:
        raise ValueError("gpus and nodes must be at least 1")
    job = job_from_cronjob(cronjob, name, config, epochs, precision, backend)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    trainer = _trainer(job)
    resources = trainer.setdefault("resources", {})
    if gpus > 1 or nodes > 1:
        if str(resources.get("limits", {}).get(GPU, "0")) == "0":
            raise ValueError("the trainer template asks for no GPU (the cpu overlay?): "
                             "--gpus and --nodes need the production overlay's GPU trainer")
    for section in ("requests", "limits"):
        for resource, value in list(resources.get(section, {}).items()):
            resources[section][resource] = str(gpus) if resource == GPU else _scale_quantity(value, gpus)
    if scale_batch:
        from training.recipe.configs import get_config
        from training.run.distribute import scaled_for_replicas
        scaled = scaled_for_replicas(get_config(config, epochs=epochs), gpus * nodes)
        trainer["args"] = _with_option(trainer["args"], "--batch-size", str(scaled.batch_size))
        trainer["args"] = _with_option(trainer["args"], "--learning-rate", f"{scaled.learning_rate:g}")
    if gpus > 1:
        # NCCL passes tensors between the GPUs of a pod through shared memory, and a container's
        # /dev/shm is 64 MiB unless a memory volume replaces it.
        pod.setdefault("volumes", []).append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}})
        trainer.setdefault("volumeMounts", []).append({"name": "dshm", "mountPath": "/dev/shm"})
    if nodes == 1:
        return [job]

    labels = {TRAIN_JOB_LABEL: name, COLLECTIVE_LABEL: "true"}
    job["metadata"]["labels"].update(labels)
    pod_meta = spec["template"]["metadata"]
    pod_meta["labels"].update(labels)
    spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes,
                backoffLimit=spec.get("backoffLimit", 2) * nodes)
    pod["subdomain"] = name
    trainer["ports"] = [{"name": "collective", "containerPort": port, "protocol": "TCP"}]
    trainer["env"] = [*trainer.get("env", []),
                      {"name": "TRAIN_WORKERS", "value": str(nodes)},
                      {"name": "TRAIN_SERVICE", "value": name},
                      {"name": "TRAIN_PORT", "value": str(port)}]
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"app": "trainer", TRAIN_JOB_LABEL: name}},
        "spec": {
            # Headless: each pod's DNS name <name>-<index>.<name> resolves to the pod itself,
            # from the moment it runs (no readiness to wait for: the workers wait for each other).
            "clusterIP": "None", "publishNotReadyAddresses": True,
            "selector": {TRAIN_JOB_LABEL: name},
            "ports": [{"name": "collective", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }
    if job["metadata"].get("namespace"):
        service["metadata"]["namespace"] = job["metadata"]["namespace"]
    return [job, service]


def study_job(cronjob: dict, name: str, configs: list[str], seeds: list[int] | None = None,
              parallelism: int = 1, epochs: int | None = None, retries: int | None = None) -> dict:
    """The study as one Indexed Job: completions = configurations x seeds, index i running
    `python -m training.lab.study ... --index-from-env`, i.e. run i of training.lab.study.study_runs, in
    its own directory under /runs/<name>/; `parallelism` runs at once, each pod with the
    template's resources (one GPU in production). A failed index is retried alone, up to
    `retries` times (backoffLimitPerIndex; default the template's backoffLimit), while the
    others go on; pods evicted or preempted (DisruptionTarget) are not counted against it. Every
    finished index rebuilds /runs/<name>/STUDY.md from the results present."""
    from training.lab.study import study_runs
    runs = study_runs(configs, seeds, "/")  # the one mapping from index to (config, seed, run directory)
    template = copy.deepcopy(cronjob["spec"]["jobTemplate"])
    spec = template["spec"]
    pod = spec["template"]
    trainer = next((c for c in pod["spec"]["containers"] if c["name"] == CONTAINER), None)
    if trainer is None:
        raise ValueError(f"CronJob {cronjob['metadata']['name']} has no container {CONTAINER!r}")
    template_args = trainer.get("args", [])
    args = ["--configs", ",".join(configs), "--out", _option(template_args, "--run-dir") or "/runs/$(JOB_NAME)",
            "--data", _option(template_args, "--data") or "/data", "--index-from-env"]
    if seeds:
        args += ["--seeds", ",".join(map(str, seeds))]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    trainer["command"], trainer["args"] = list(STUDY_COMMAND), args

    parallelism = max(1, min(parallelism, len(runs)))
    per_index = spec.pop("backoffLimit", 2) if retries is None else retries
    deadline = spec.get("activeDeadlineSeconds")
    spec.update(completionMode="Indexed", completions=len(runs), parallelism=parallelism,
                backoffLimitPerIndex=per_index,
                podFailurePolicy={"rules": [{"action": "Ignore",
                                               "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]})
    spec.pop("backoffLimit", None)  # the budget is per index; the Job fails only once an index has spent its own
    if deadline:  # the template's deadline is one run's: a study has ceil(runs / parallelism) waves of them
        spec["activeDeadlineSeconds"] = deadline * math.ceil(len(runs) / parallelism)
    label = {STUDY_LABEL: _label_value(name)}
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(label)
    metadata = {"name": name, "labels": {**template.get("metadata", {}).get("labels", {}), **label},
                "annotations": {"cronjob.kubernetes.io/instantiate": "manual",
                                "cifar10/study-runs": ",".join(f"{r.index}={r.run_dir.name}" for r in runs)[:4000]}}
    if cronjob["metadata"].get("namespace"):
        metadata["namespace"] = cronjob["metadata"]["namespace"]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def index_set(text: str | None) -> set[int]:
    """The indexes of a Job status' completedIndexes / failedIndexes ("0-2,5" -> {0, 1, 2, 5})."""
    out = set()
    for part in (text or "").split(","):
        if part:
            first, _, last = part.partition("-")
            out.update(range(int(first), int(last or first) + 1))
    return out


def follow_indexed(cluster, namespace: str, name: str, completions: int, out=sys.stdout,
                   timeout_s: float = 7 * 86400, poll_s: float = 15.0, clock=time.monotonic,
                   sleep=time.sleep) -> tuple[bool, str]:
    """Reports an Indexed Job's progress (indexes done, failed, running) until it finishes; then
    prints the STUDY.md table from the log of the pod that finished last. Returns (ok, reason)."""
    deadline, seen = clock() + timeout_s, None
    while True:
        status = cluster.job_status(namespace, name)
        done, failed = index_set(status.get("completedIndexes")), index_set(status.get("failedIndexes"))
        progress = (len(done), tuple(sorted(failed)), status.get("active", 0))
        if progress != seen:
            seen = progress
            out.write(f"{len(done)}/{completions} runs done, {status.get('active', 0)} running"
                      + (f", failed for good: {sorted(failed)}" if failed else "") + "\n")
            out.flush()
        outcome = job_outcome(status)
        if outcome:
            table = last_table(cluster, namespace, name)
            if table:
                out.write(table + "\n")
            return outcome
        if clock() > deadline:
            return False, f"timed out after {timeout_s:.0f}s; the Job is still there"
        sleep(poll_s)


def _finished_at(pod: dict) -> str:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated") or {}
        if terminated.get("finishedAt"):
            return str(terminated["finishedAt"])
    return str(pod["metadata"].get("creationTimestamp") or "")


def last_table(cluster, namespace: str, name: str) -> str | None:
    """The STUDY.md table the last pod to succeed printed (it includes every run finished before)."""
    pods = [p for p in cluster.job_pods(namespace, name) if (p.get("status") or {}).get("phase") == "Succeeded"]
    for pod in sorted(pods, key=_finished_at, reverse=True):
        log = "".join(cluster.log_stream(namespace, pod["metadata"]["name"], CONTAINER))
        start = log.rfind("# Study (")
        if start >= 0:
            return log[start:].rstrip()
    return None


def jax_image(image: str) -> str:
    """The BACKEND=jax build of `image`: its tag with -jax appended (latest-jax without a tag)."""
    name, _, digest = image.partition("@")
    if digest:
        raise ValueError(f"{image}: pinned by digest; give the JAX image's digest in the overlay instead")
    repository, tag = (name.rsplit(":", 1) if ":" in name.rsplit("/", 1)[-1] else (name, "latest"))
    return f"{repository}:{tag}-jax"


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    """args with `option value` set: replaced where present, else appended."""
    args = list(args)
    if option in args:
        i = args.index(option)
        if i + 1 >= len(args):
            raise ValueError(f"{option} has no value in the template's args: {args}")
        args[i + 1] = value
    else:
        args += [option, value]
    return args


def _label_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.") or "none"


def job_outcome(job_status: dict) -> tuple[bool, str] | None:
    """(succeeded, reason) once the Job has finished, else None."""
    for condition in job_status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition["type"] == "Complete":
            return True, "Complete"
        if condition["type"] == "Failed":
            return False, f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".strip()
    return None


def stuck_reason(pod: dict) -> str | None:
    """Why a pod's container cannot start (bad image, missing config), if it cannot."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return f"{waiting['reason']}: {waiting.get('message', '')}".strip()
    return None


def follow(cluster, namespace: str, name: str, out=sys.stdout, timeout_s: float = 86400,
           poll_s: float = 5.0, clock=time.monotonic, sleep=time.sleep) -> tuple[bool, str]:
    """Streams each of the Job's pods' logs in turn (a retry is a new pod) until it finishes.

    Returns (succeeded, reason). A pod whose container cannot start fails it at once, since
    the Job controller would only wait for it.
    """
    deadline = clock() + timeout_s
    streamed = set()
    while True:
        outcome = job_outcome(cluster.job_status(namespace, name))
        pods = sorted(cluster.job_pods(namespace, name),
                      key=lambda p: p["metadata"].get("creationTimestamp") or "")
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            phase = (pod.get("status") or {}).get("phase")
            if pod_name in streamed:
                continue
            reason = stuck_reason(pod)
            if reason:
                return False, f"pod {pod_name} cannot start: {reason}"
            if phase in ("Running", "Succeeded", "Failed"):
                streamed.add(pod_name)
                out.write(f"--- logs of pod {pod_name}\n")
                for chunk in cluster.log_stream(namespace, pod_name, CONTAINER):
                    out.write(chunk)
                out.flush()
        if outcome:
            return outcome
        if clock() > deadline:
            return False, f"timed out after {timeout_s:.0f}s; the Job is still there"
        sleep(poll_s)


class Cluster:
    """The few API calls the tool makes, as plain dicts. Needs a cluster (kubeconfig or in-cluster)."""

    def __init__(self, context: str | None = None):
        try:
            config.load_kube_config(context=context)
        except config.ConfigException:
            config.load_incluster_config()
        self._api = client.ApiClient()
        self._batch = client.BatchV1Api(self._api)
        self._core = client.CoreV1Api(self._api)

    def _dict(self, obj) -> dict:
        return self._api.sanitize_for_serialization(obj)

    def cronjob(self, namespace: str, name: str) -> dict:
        return self._dict(self._batch.read_namespaced_cron_job(name, namespace))

    def create_job(self, namespace: str, job: dict) -> str:
        """Creates the Job; returns its uid (what objects it owns refer to)."""
        return self._batch.create_namespaced_job(namespace, client.V1Job.from_dict(job)).metadata.uid

    def create_service(self, namespace: str, service: dict) -> None:
        self._core.create_namespaced_service(namespace, client.V1Service.from_dict(service))

    def job_status(self, namespace: str, name: str) -> dict:
        return self._dict(self._batch.read_namespaced_job_status(name, namespace)).get("status") or {}

    def job_pods(self, namespace: str, name: str) -> list[dict]:
        pods = self._core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}")
        return self._dict(pods)["items"]

    def log_stream(self, namespace: str, pod: str, container: str):
        response = self._core.read_namespaced_pod_log(
            pod, namespace, container=container, follow=True, _preload_content=False)
        try:
            for chunk in response.stream(4096):
                yield chunk.decode("utf-8", errors="replace")
        finally:
            response.release_conn()
