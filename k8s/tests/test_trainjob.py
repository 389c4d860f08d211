"""make train-k8s (k8s.trainjob) without a cluster.

The Job is built from the real rendered CronJob and checked against the Kubernetes schema and
the client's own model; following a Job runs against FakeCluster, which stands in for the four
API calls (read Job status, list its pods, stream a pod's log, create a Job) with the object
shapes the API server returns. Talking to a real API server (`Cluster`) needs a cluster.
"""
import io
import json
import re
from datetime import datetime, timezone

import pytest
import yaml
from kubernetes import client
from kubernetes_validate import utils as kv

from k8s import trainjob
from k8s.tests.manifests import K8S_VERSION, ROOT, rendered
from k8s.trainjob.__main__ import main

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def cronjob(overlay="k8s"):
    return next(o for o in rendered(overlay) if o["kind"] == "CronJob")


def trainer_container(job):
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer")


# ---- naming ---------------------------------------------------------------------------------

def test_job_name_format():
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert trainjob.job_name("vgg3_bn", now, "ab12") == "train-vgg3-bn-20260304-050607-ab12"


@pytest.mark.parametrize("config", ["default", "fast", "vgg3_bn", "BASE3", "__", "x" * 200])
def test_job_names_are_unique_dns_labels(config):
    names = {trainjob.job_name(config) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert len(name) <= 63 and DNS_LABEL.fullmatch(name), name


# ---- the Job manifest -----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", ["k8s", "k8s/overlays/cpu"])
def test_job_from_rendered_template_is_schema_valid(overlay):
    job = trainjob.job_from_cronjob(cronjob(overlay), "train-x-1", "vgg3_bn", epochs=3)
    assert kv.validate(job, K8S_VERSION, strict=True)
    # The client's own model accepts it too (create_job sends it through V1Job).
    model = client.V1Job.from_dict(job)
    assert client.ApiClient().sanitize_for_serialization(model) == job


def test_job_changes_only_config_and_epochs():
    template = cronjob()
    before = json.dumps(template, sort_keys=True)
    job = trainjob.job_from_cronjob(template, "train-x-1", "fast", epochs=2)
    assert json.dumps(template, sort_keys=True) == before  # the template is not modified

    args = trainer_container(job)["args"]
    assert args[args.index("--config") + 1] == "fast"
    assert args[args.index("--epochs") + 1] == "2"
    assert args[args.index("--export-base") + 1] == "/models/cifar10"
    assert "/runs/$(JOB_NAME)" in args  # one run directory per Job

    assert job["metadata"]["name"] == "train-x-1"
    assert job["metadata"]["namespace"] == "cifar10"
    assert job["metadata"]["labels"]["app"] == "trainer"
    assert job["metadata"]["labels"][trainjob.CONFIG_LABEL] == "fast"
    assert job["spec"]["template"]["metadata"]["labels"][trainjob.CONFIG_LABEL] == "fast"
    # Image, GPU and volumes are the overlay's.
    template_pod = template["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["volumes"] == template_pod["volumes"]
    assert job_pod["tolerations"] == template_pod["tolerations"]
    assert trainer_container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_job_without_epochs_keeps_the_configs():
    args = trainer_container(trainjob.job_from_cronjob(cronjob(), "n", "default"))["args"]
    assert "--epochs" not in args and "--precision" not in args


def test_job_precision_reaches_the_trainer():
    args = trainer_container(trainjob.job_from_cronjob(cronjob(), "n", "default",
                                                       precision="mixed_bfloat16"))["args"]
    assert args[args.index("--precision") + 1] == "mixed_bfloat16"


@pytest.mark.parametrize("overlay,image", [("k8s", "cifar10/trainer:1.0.0-gpu"), ("k8s/overlays/cpu", None)])
def test_job_backend_sets_keras_backend_and_jax_runs_the_jax_image(overlay, image):
    template = cronjob(overlay)
    image = image or trainer_container(template["spec"]["jobTemplate"])["image"]
    for backend in ("tensorflow", "jax"):
        job = trainjob.job_from_cronjob(template, "train-x-1", "default", backend=backend)
        assert kv.validate(job, K8S_VERSION, strict=True)
        trainer = trainer_container(job)
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert env["KERAS_BACKEND"] == backend and "JOB_NAME" in env  # the template's env is kept
        if backend == "jax":
            assert trainer["image"] == trainjob.jax_image(image) and trainer["image"].endswith("-jax")
            assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
        else:
            assert trainer["image"] == image and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env
    assert "KERAS_BACKEND" not in {e["name"] for e in trainer_container(
        trainjob.job_from_cronjob(template, "n", "default"))["env"]}  # no choice: the image's default


def test_jax_image_names():
    assert trainjob.jax_image("cifar10/trainer:1.0.0-gpu") == "cifar10/trainer:1.0.0-gpu-jax"
    assert trainjob.jax_image("registry:5000/cifar10/trainer") == "registry:5000/cifar10/trainer:latest-jax"
    with pytest.raises(ValueError, match="digest"):
        trainjob.jax_image("cifar10/trainer@sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="backend must be one of tensorflow, jax"):
        trainjob.job_from_cronjob(cronjob(), "n", "default", backend="torch")


def test_dry_run_with_backend_jax(tmp_path):
    rendered_file = tmp_path / "k8s.yaml"
    rendered_file.write_text(yaml.safe_dump_all(list(rendered("k8s"))))
    out = io.StringIO()
    assert main(["--dry-run", "--template-file", str(rendered_file), "--config", "fast", "--backend", "jax"],
                out=out) == 0
    assert '"KERAS_BACKEND"' in out.getvalue() and "1.0.0-gpu-jax" in out.getvalue()


def test_template_without_trainer_is_refused():
    template = json.loads(json.dumps(cronjob()))
    template["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["name"] = "x"
    with pytest.raises(ValueError, match="no container 'trainer'"):
        trainjob.job_from_cronjob(template, "n", "default")


def test_dry_run_prints_the_job(tmp_path):
    rendered_file = tmp_path / "k8s.yaml"
    rendered_file.write_text(yaml.safe_dump_all(list(rendered("k8s"))))
    out = io.StringIO()
    assert main(["--dry-run", "--template-file", str(rendered_file), "--config", "base3"],
                out=out) == 0
    job = json.loads(out.getvalue())
    assert job["kind"] == "Job" and job["metadata"]["name"].startswith("train-base3-")
    assert kv.validate(job, K8S_VERSION, strict=True)


# ---- following a Job ------------------------------------------------------------------------

def pod(name, phase, created, waiting=None):
    status = {"phase": phase}
    if waiting:
        status["containerStatuses"] = [{"name": "trainer",
                                        "state": {"waiting": {"reason": waiting, "message": "m"}}}]
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


COMPLETE = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                          "message": "Job has reached the specified backoff limit"}], "failed": 3}


class FakeCluster:
    """Replays one (job status, pods) snapshot per poll; records what the tool asked for."""

    def __init__(self, snapshots, logs=None, template=None):
        self.snapshots, self.logs, self.template = list(snapshots), logs or {}, template
        self.polls, self.streamed, self.created = 0, [], []

    def _snapshot(self):
        return self.snapshots[min(self.polls, len(self.snapshots) - 1)]

    def job_status(self, namespace, name):
        self.polls += 1
        return self._snapshot()[0]

    def job_pods(self, namespace, name):
        return self._snapshot()[1]

    def log_stream(self, namespace, pod_name, container):
        self.streamed.append((pod_name, container))
        yield from self.logs.get(pod_name, [])

    def cronjob(self, namespace, name):
        assert (namespace, name) == ("cifar10", "trainer")
        return self.template

    def create_job(self, namespace, job):
        self.created.append((namespace, job))


def run_follow(cluster, **kw):
    out = io.StringIO()
    result = trainjob.follow(cluster, "cifar10", "train-x", out=out, poll_s=0,
                             sleep=lambda s: None, **kw)
    return result, out.getvalue()


def test_follow_waits_streams_and_succeeds():
    cluster = FakeCluster(
        [({}, []),
         ({"active": 1}, [pod("p1", "Pending", "t1")]),
         ({"active": 1}, [pod("p1", "Running", "t1")]),
         (COMPLETE, [pod("p1", "Succeeded", "t1")])],
        logs={"p1": ["epoch 1/2\n", "epoch 2/2\nexported version 2\n"]})
    (ok, reason), out = run_follow(cluster)
    assert (ok, reason) == (True, "Complete")
    assert cluster.streamed == [("p1", "trainer")]  # once, though seen in several polls
    assert "epoch 2/2\nexported version 2\n" in out


def test_follow_streams_each_retry_and_reports_failure():
    cluster = FakeCluster(
        [({"active": 1}, [pod("p1", "Failed", "t1")]),
         ({"active": 1}, [pod("p1", "Failed", "t1"), pod("p2", "Running", "t2")]),
         (FAILED, [pod("p2", "Failed", "t2"), pod("p1", "Failed", "t1")])],
        logs={"p1": ["first try\n"], "p2": ["second try\n"]})
    (ok, reason), out = run_follow(cluster)
    assert not ok and reason.startswith("BackoffLimitExceeded")
    assert [p for p, _ in cluster.streamed] == ["p1", "p2"]
    assert out.index("first try") < out.index("second try")


def test_follow_gives_up_on_a_pod_that_cannot_start():
    cluster = FakeCluster([({"active": 1}, [pod("p1", "Pending", "t1", waiting="ImagePullBackOff")])])
    (ok, reason), _ = run_follow(cluster)
    assert not ok and "ImagePullBackOff" in reason
    assert cluster.streamed == []


def test_follow_times_out():
    ticks = iter(range(0, 1000, 10))
    cluster = FakeCluster([({"active": 1}, [pod("p1", "Pending", "t1")])])
    (ok, reason), _ = run_follow(cluster, timeout_s=30, clock=lambda: next(ticks))
    assert not ok and reason.startswith("timed out after 30s")


@pytest.mark.parametrize("final,code", [(COMPLETE, 0), (FAILED, 1)])
def test_main_creates_follows_and_exits(final, code):
    cluster = FakeCluster([(final, [pod("p1", "Succeeded", "t1")])], logs={"p1": ["done\n"]},
                          template=cronjob())
    out = io.StringIO()
    assert main(["--config", "fast", "--epochs", "1"], cluster_factory=lambda ctx: cluster,
                out=out) == code
    (namespace, job), = cluster.created
    assert namespace == "cifar10" and job["metadata"]["name"].startswith("train-fast-")
    assert f"job/{job['metadata']['name']}: " in out.getvalue()


def test_unknown_config_is_refused_before_anything_is_created(capsys):
    cluster = FakeCluster([], template=cronjob())
    with pytest.raises(SystemExit):
        main(["--config", "vgg3-bn"], cluster_factory=lambda ctx: cluster)
    assert "invalid choice: 'vgg3-bn'" in capsys.readouterr().err
    assert cluster.created == []


def test_make_target_runs_the_tool():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train-k8s:.*## ", makefile, re.M)
    assert "k8s.trainjob,--config $(CONFIG)" in makefile
    assert "--backend $(BACKEND)" in makefile and re.search(r"^BACKEND \?= tensorflow$", makefile, re.M)
