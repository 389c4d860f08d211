"""make study-k8s and make train-k8s GPUS= NODES= without a cluster: the Indexed Jobs (and the
headless Service) built from the real rendered CronJob pass the Kubernetes 1.32 schemas, the
client's own model and the policy rules; the pods' index-to-run mapping and TF_CONFIG are the
ones training/ computes; following an Indexed Job runs against the fake of test_trainjob."""
import functools
import io
import json
import re

import pytest
from kubernetes import client
from kubernetes_validate import utils as kv

from k8s import trainjob
from k8s.tests import policy
from k8s.tests.manifests import K8S_VERSION, ROOT, rendered
from k8s.tests.test_trainjob import COMPLETE, FakeCluster, cronjob, pod
from k8s.trainjob.__main__ import main as train_main
from k8s.trainjob import study
from k8s.trainjob.study import main as study_main
from training.lab.study import study_runs
from training.recipe.configs import get_config
from training.run.distribute import tf_config_from_job

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
CONFIGS, SEEDS = ["base1", "base3", "fast"], [0, 1, 2]


def valid(obj):
    """Strict schema and the client's model (what create_* sends) both accept it unchanged."""
    assert kv.validate(obj, K8S_VERSION, strict=True)
    model = getattr(client, f"V1{obj['kind']}").from_dict(obj)
    assert client.ApiClient().sanitize_for_serialization(model) == obj
    return True


def trainer(job):
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "trainer")


def arg(container, option):
    return policy.flag(container["args"], option)


def env_of(job, index):
    """The environment a pod of the Job sees: its container's env (fieldRefs resolved as the
    kubelet would) plus what the Job controller injects into an Indexed Job's pods."""
    env = {v["name"]: v.get("value") for v in trainer(job).get("env", [])}
    env.update(JOB_NAME=job["metadata"]["name"], JOB_COMPLETION_INDEX=str(index))
    return env


# ---- the study: one Indexed Job ---------------------------------------------------------------

@pytest.mark.parametrize("overlay", ["k8s", "k8s/overlays/cpu"])
def test_study_job_is_schema_valid_indexed_and_passes_the_policies(overlay):
    objs = list(rendered(overlay))
    job = trainjob.study_job(cronjob(overlay), "study-x-1", CONFIGS, SEEDS, parallelism=4, epochs=10)
    assert valid(job)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == len(CONFIGS) * len(SEEDS) == 9 and spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec  # a failed run retries alone
    assert spec["podFailurePolicy"]["rules"][0] == {"action": "Ignore",
                                                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # what backoffLimitPerIndex requires
    assert spec["activeDeadlineSeconds"] == 86400 * 3  # 9 runs, 4 at a time: 3 waves of one run's deadline
    everything = objs + [job]
    assert policy.check_security([job]) == [] and policy.check_resources([job]) == []
    assert policy.check_images([job]) == [] and policy.check_references(everything) == []
    gpus = [str(trainer(job)["resources"][s].get("nvidia.com/gpu")) for s in ("requests", "limits")]
    assert gpus == (["1", "1"] if overlay == "k8s" else ["None", "None"])  # one GPU per run in production
    assert policy.ingress_sources(everything, job) == set()  # nothing reaches a study's pods


def test_each_study_index_runs_the_run_training_study_maps_it_to():
    job = trainjob.study_job(cronjob(), "study-x-1", CONFIGS, SEEDS, parallelism=2)
    c = trainer(job)
    assert c["command"] == ["python", "-m", "training.lab.study"] and "--index-from-env" in c["args"]
    configs, seeds = arg(c, "--configs").split(","), [int(s) for s in arg(c, "--seeds").split(",")]
    assert (configs, seeds) == (CONFIGS, SEEDS)
    assert arg(c, "--out") == "/runs/$(JOB_NAME)" and arg(c, "--data") == "/data"
    runs = study_runs(configs, seeds, "/runs/study-x-1")
    assert len(runs) == job["spec"]["completions"]
    assert [(r.config, r.seed) for r in runs[:4]] == [("base1", 0), ("base1", 1), ("base1", 2), ("base3", 0)]
    assert [r.run_dir.name for r in runs[:3]] == ["base1", "base1-seed1", "base1-seed2"]
    assert len({r.run_dir for r in runs}) == len(runs)  # each index its own directory
    annotation = job["metadata"]["annotations"]["cifar10/study-runs"]
    assert annotation.startswith("0=base1,1=base1-seed1,2=base1-seed2,3=base3")


def test_study_without_seeds_runs_each_config_once_with_its_own_seed():
    job = trainjob.study_job(cronjob(), "study-x-1", ["base1", "fast"], parallelism=8)
    assert job["spec"]["completions"] == 2 and job["spec"]["parallelism"] == 2
    assert "--seeds" not in trainer(job)["args"]


def test_study_dry_run_prints_a_valid_job(tmp_path):
    import yaml
    rendered_file = tmp_path / "k8s.yaml"
    rendered_file.write_text(yaml.safe_dump_all(list(rendered("k8s"))))
    out = io.StringIO()
    assert study_main(["--dry-run", "--template-file", str(rendered_file), "--configs", "base1,base3",
                       "--seeds", "0,1", "--parallelism", "3"], out=out) == 0
    job = json.loads(out.getvalue())
    assert job["metadata"]["name"].startswith("study-2configs-") and valid(job)
    assert job["spec"]["completions"] == 4 and job["spec"]["parallelism"] == 3


def test_study_refuses_unknown_configs_before_anything_is_created(capsys):
    cluster = FakeCluster([], template=cronjob())
    with pytest.raises(SystemExit):
        study_main(["--configs", "base1,vgg3-bn"], cluster_factory=lambda ctx: cluster)
    assert "unknown config vgg3-bn" in capsys.readouterr().err and cluster.created == []


class IndexedFake(FakeCluster):
    def create_job(self, namespace, job):
        super().create_job(namespace, job)
        return "uid-1"

    def create_service(self, namespace, service):
        self.created.append((namespace, service))


def test_following_a_study_reports_progress_and_prints_the_last_table(monkeypatch):
    # The real follow loop, its sleeps recorded instead of slept (as test_trainjob's run_follow).
    slept = []
    monkeypatch.setattr(study, "follow_indexed", functools.partial(trainjob.follow_indexed, sleep=slept.append))
    running = {"active": 2, "completedIndexes": "0"}
    status = {**COMPLETE, "completedIndexes": "0-2"}
    last = pod("p2", "Succeeded", "t3")
    last["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"finishedAt": "t9"}}}]
    cluster = IndexedFake(
        [(running, []), (running, []), (status, [pod("p0", "Succeeded", "t1"), last, pod("p1", "Succeeded", "t2")])],
        logs={"p2": ["=== [2] ...\n# Study (1024 training images)\n\n| config |\n| base1 | 3/3 |\n"],
              "p0": ["# Study (old)\n| base1 | 1/3 |\n"]},
        template=cronjob())
    out = io.StringIO()
    assert study_main(["--configs", "base1", "--seeds", "0,1,2"], cluster_factory=lambda ctx: cluster, out=out) == 0
    (namespace, job), = cluster.created
    assert job["spec"]["completions"] == 3
    text = out.getvalue()
    assert "1/3 runs done, 2 running" in text and "3/3 runs done" in text
    assert text.count("1/3 runs done") == 1  # reported when it changes, not every poll
    assert "| base1 | 3/3 |" in text and "(old)" not in text
    assert slept == [15.0]  # one poll while running, at the default interval


def test_index_sets_of_a_job_status():
    assert trainjob.index_set("0-2,5,7-8") == {0, 1, 2, 5, 7, 8} and trainjob.index_set(None) == set()


# ---- one run on many GPUs: MirroredStrategy in a pod, MultiWorkerMirroredStrategy across pods --

def test_one_pod_with_8_gpus_is_a_plain_job_with_8_gpus_and_shared_memory():
    job, = trainjob.distributed_job(cronjob(), "train-x-1", "default", gpus=8)
    assert valid(job) and "completionMode" not in job["spec"]
    res = trainer(job)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"
    assert res["requests"]["cpu"] == "16" and res["limits"]["memory"] == "64Gi"  # the template's x 8
    pod_spec = job["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod_spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer(job)["volumeMounts"]
    assert policy.check_security([job]) == [] and policy.check_references(list(rendered("k8s")) + [job]) == []


def test_two_pods_with_8_gpus_each_are_an_indexed_job_behind_a_headless_service():
    objs = list(rendered("k8s"))
    job, service = trainjob.distributed_job(cronjob(), "train-default-20260304-050607-ab12cd34", "default",
                                            gpus=8, nodes=2)
    assert valid(job) and valid(service)
    spec, name = job["spec"], job["metadata"]["name"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 4  # the template's 2, for each pod that may fail per restart
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["namespace"] == "cifar10"
    everything = objs + [job, service]
    # The Service selects exactly this Job's pods, on a port they declare; every pod asks for 8 GPUs.
    assert policy.check_services(everything) == []
    assert policy.check_security([job]) == [] and policy.check_resources([job]) == []
    assert policy.check_references(everything) == []
    assert trainer(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The workers reach each other, and nothing else reaches them.
    assert policy.ingress_sources(everything, job) == {"pod:trainer"}
    # TF_CONFIG, as each pod builds it: every worker at its pod's DNS name.
    for index in (0, 1):
        tf_config = tf_config_from_job(env_of(job, index))
        assert tf_config["task"] == {"type": "worker", "index": index}
        assert tf_config["cluster"]["worker"] == [f"{name}-{i}.{name}:12345" for i in (0, 1)]
        assert len(f"{name}-{index}") <= 63 and DNS_LABEL.fullmatch(f"{name}-{index}")
    # All write one run directory (worker 0 only, training.run.distribute); one export.
    assert arg(trainer(job), "--run-dir") == "/runs/$(JOB_NAME)"
    assert arg(trainer(job), "--export-base") == "/models/cifar10"


def test_the_default_keeps_the_configs_global_batch_and_scale_batch_scales_it_with_the_learning_rate():
    job, _ = trainjob.distributed_job(cronjob(), "n", "default", gpus=8, nodes=2)
    assert "--batch-size" not in trainer(job)["args"] and "--learning-rate" not in trainer(job)["args"]
    job, _ = trainjob.distributed_job(cronjob(), "n", "default", gpus=8, nodes=2, scale_batch=True)
    config = get_config("default")
    assert arg(trainer(job), "--batch-size") == str(config.batch_size * 16)
    assert float(arg(trainer(job), "--learning-rate")) == pytest.approx(config.learning_rate * 16)  # SGD: linear


def test_one_gpu_one_pod_is_exactly_the_single_job():
    job, = trainjob.distributed_job(cronjob(), "n", "fast", epochs=2)
    assert job == trainjob.job_from_cronjob(cronjob(), "n", "fast", epochs=2)


def test_gpus_on_a_template_without_gpu_are_refused():
    with pytest.raises(ValueError, match="asks for no GPU"):
        trainjob.distributed_job(cronjob("k8s/overlays/cpu"), "n", "fast", gpus=2)


def test_train_dry_run_prints_job_and_service_and_creating_makes_the_job_own_the_service(tmp_path):
    import yaml
    rendered_file = tmp_path / "k8s.yaml"
    rendered_file.write_text(yaml.safe_dump_all(list(rendered("k8s"))))
    out = io.StringIO()
    assert train_main(["--dry-run", "--template-file", str(rendered_file), "--config", "fast", "--gpus", "2",
                       "--nodes", "3"], out=out) == 0
    job, service = [json.loads(doc) for doc in out.getvalue().split("---\n")]
    assert job["kind"] == "Job" and service["kind"] == "Service" and valid(job) and valid(service)

    cluster = IndexedFake([(COMPLETE, [])], template=cronjob())
    assert train_main(["--config", "fast", "--nodes", "2", "--no-follow"], cluster_factory=lambda ctx: cluster,
                      out=io.StringIO()) == 0
    (_, job), (_, service) = cluster.created
    assert service["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "blockOwnerDeletion": True,
                                                       "name": job["metadata"]["name"], "uid": "uid-1"}]


def test_production_shares_the_trainer_volumes_across_nodes():
    claims = {o["metadata"]["name"]: o["spec"]["accessModes"] for o in rendered("k8s")
              if o["kind"] == "PersistentVolumeClaim"}
    assert claims["trainer-runs"] == claims["trainer-data"] == ["ReadWriteMany"]


def test_make_targets_run_the_tools():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^study-k8s:.*## ", makefile, re.M)
    assert "-m k8s.trainjob.study" in makefile
    assert "$(if $(GPUS),--gpus $(GPUS))" in makefile and "$(if $(NODES),--nodes $(NODES))" in makefile
