"""The two model-seeding scripts (k8s initContainer, compose model-init) run for real with sh,
on temporary directories in place of the volumes: they copy the default model into an empty
volume, leave an existing version alone, and leave no temporary directory behind."""
import os
import subprocess

import pytest

from k8s.tests import policy
from k8s.tests.manifests import compose_config, rendered


def k8s_script():
    init = policy.container(policy.workload(rendered("k8s"), "tfserving"), "seed-model")
    assert init["command"][:2] == ["sh", "-ec"]
    return init["command"][2], "/app/models"


def compose_script():
    command = compose_config()["services"]["model-init"]["command"]
    assert command[:2] == ["sh", "-ec"]
    script = command[2].replace("$$", "$")  # compose's escape for a literal $
    if os.geteuid() != 0:  # handing the volume to uid 10001 needs root, as in the container
        script = script.replace("chown -R 10001:10001 /models", "true")
    return script, "/seed"


@pytest.fixture(params=[k8s_script, compose_script], ids=["k8s", "compose"])
def seed(request, tmp_path):
    script, source_root = request.param()
    src = tmp_path / "src"
    (src / "cifar10" / "1" / "variables").mkdir(parents=True)
    (src / "cifar10" / "1" / "saved_model.pb").write_bytes(b"default model")
    script = script.replace(source_root, str(src)).replace("/models", str(tmp_path / "models"))

    def run():
        subprocess.run(["sh", "-ec", script], check=True, capture_output=True, timeout=30,
                       env={**os.environ, "HOSTNAME": "pod-a"})
        return tmp_path / "models" / "cifar10"
    return run


def test_seeds_an_empty_volume(seed):
    models = seed()
    assert (models / "1" / "saved_model.pb").read_bytes() == b"default model"
    assert (models / "1" / "variables").is_dir()
    assert sorted(p.name for p in models.iterdir()) == ["1"]  # no temp dir left


def test_leaves_a_trained_version_alone(seed, tmp_path):
    trained = tmp_path / "models" / "cifar10" / "7"
    trained.mkdir(parents=True)
    (trained / "saved_model.pb").write_bytes(b"trained")
    models = seed()
    assert sorted(p.name for p in models.iterdir()) == ["7"]


def test_second_run_changes_nothing(seed):
    models = seed()
    (models / "1" / "saved_model.pb").write_bytes(b"served")
    seed()
    assert (models / "1" / "saved_model.pb").read_bytes() == b"served"
