"""Train a new model version on the cluster: a Job from the `trainer` CronJob template.

The CronJob (k8s/base/trainer.yaml) is suspended and never runs by itself; it holds the pod
template of the deployed overlay (image, GPU, volumes). Each run becomes a Job with a unique
name; the trainer writes the next integer model version into the model volume and TF Serving
picks it up.

Everything here except `Cluster` works on plain dicts and is unit-tested without a cluster.
"""
import copy
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
# Reasons a pod can sit in Waiting for good; the Job would otherwise look merely slow.
STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                 "CreateContainerConfigError", "CreateContainerError"}


def job_name(config: str, now: datetime | None = None, suffix: str | None = None) -> str:
    """`train-<config>-<UTC time>-<random>`: unique, sortable, a valid DNS label (<= 63)."""
    now = now or datetime.now(timezone.utc)
    suffix = suffix or secrets.token_hex(4)  # two jobs in one second must not collide
    slug = re.sub(r"[^a-z0-9]+", "-", config.lower()).strip("-")[:24].strip("-") or "model"
    return f"train-{slug}-{now:%Y%m%d-%H%M%S}-{suffix}"


def job_from_cronjob(cronjob: dict, name: str, config: str, epochs: int | None = None,
                     precision: str | None = None) -> dict:
    """The Job manifest for one training run, from the CronJob's jobTemplate.

    Only the trainer's `--config` (and `--epochs`, `--precision`) change; image, resources, GPU
    scheduling and volumes stay as the deployed overlay defines them.
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

    def create_job(self, namespace: str, job: dict) -> None:
        self._batch.create_namespaced_job(namespace, client.V1Job.from_dict(job))

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
