"""The two model-seeding scripts (k8s initContainer, compose model-init) run for real with sh,
on temporary directories in place of the volumes: they copy the highest shipped version into an
empty volume under its own number, leave an existing version alone, and leave no temporary
directory behind."""
import os
import shutil
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


def ship(src, version, content):
    """A fake SavedModel as shipped version `version`."""
    (src / version / "variables").mkdir(parents=True)
    (src / version / "saved_model.pb").write_bytes(content)


class Seed:
    """One seeding script, reading `src` (the shipped models/cifar10) and writing `models` (the
    volume's cifar10/) under tmp_path. Ships the teacher as 1 and the student as 2."""

    def __init__(self, script, source_root, tmp_path):
        self.src = tmp_path / "src" / "cifar10"
        self.models = tmp_path / "models" / "cifar10"
        self.script = (script.replace(source_root, str(tmp_path / "src"))
                       .replace("/models", str(tmp_path / "models")))
        ship(self.src, "1", b"teacher")
        ship(self.src, "2", b"student")

    def __call__(self, check=True, path=None):
        env = {**os.environ, "HOSTNAME": "pod-a"}
        if path:
            env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
        result = subprocess.run(["sh", "-ec", self.script], capture_output=True, text=True,
                                timeout=30, env=env)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def versions(self):
        """Everything in the volume's cifar10/, temporary dot-dirs included."""
        return sorted(p.name for p in self.models.iterdir())


@pytest.fixture(params=[k8s_script, compose_script], ids=["k8s", "compose"])
def seed(request, tmp_path):
    return Seed(*request.param(), tmp_path)


def test_seeds_an_empty_volume_with_the_highest_version(seed):
    result = seed()
    assert seed.versions() == ["2"]  # the student under its own number, not the teacher as 1
    assert (seed.models / "2" / "saved_model.pb").read_bytes() == b"student"
    assert (seed.models / "2" / "variables").is_dir()
    assert f"seeded {seed.models}/2 " in result.stdout  # says which version


def test_versions_compare_as_numbers(seed):
    ship(seed.src, "10", b"newest")
    ship(seed.src, "11-draft", b"not a version")
    ship(seed.src, ".12-staging", b"not a version")
    seed()
    assert seed.versions() == ["10"]
    assert (seed.models / "10" / "saved_model.pb").read_bytes() == b"newest"


def test_leaves_a_trained_version_alone(seed):
    trained = seed.models / "7"
    trained.mkdir(parents=True)
    (trained / "saved_model.pb").write_bytes(b"trained")
    result = seed()
    assert seed.versions() == ["7"]
    assert (trained / "saved_model.pb").read_bytes() == b"trained"
    assert "already has a version" in result.stdout


def test_a_non_integer_name_is_not_a_version(seed):
    """A trainer's staging dot-dir or a stray file does not count as a served version."""
    (seed.models / ".3-abc").mkdir(parents=True)
    (seed.models / "3.txt").write_text("notes")
    seed()
    assert seed.versions() == [".3-abc", "2", "3.txt"]


def test_second_run_changes_nothing(seed):
    seed()
    (seed.models / "2" / "saved_model.pb").write_bytes(b"served")
    seed()
    assert seed.versions() == ["2"]
    assert (seed.models / "2" / "saved_model.pb").read_bytes() == b"served"


def test_the_loser_of_a_race_drops_its_copy(seed, tmp_path):
    """Another replica renames its copy into place between the check and this one's rename."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    racing_mv = bin_dir / "mv"
    racing_mv.write_text(
        "#!/bin/sh\n"
        'for dest in "$@"; do :; done\n'
        'mkdir -p "$dest/variables" && printf winner > "$dest/saved_model.pb"\n'
        f'exec {shutil.which("mv")} "$@"\n')
    racing_mv.chmod(0o755)
    seed(path=bin_dir)
    assert seed.versions() == ["2"]  # no temporary copy left, nothing moved inside 2/
    assert sorted(p.name for p in (seed.models / "2").iterdir()) == ["saved_model.pb",
                                                                     "variables"]
    assert (seed.models / "2" / "saved_model.pb").read_bytes() == b"winner"


def test_fails_clearly_without_a_shipped_version(seed):
    shutil.rmtree(seed.src)
    seed.src.mkdir()
    (seed.src / "README").write_text("no model here")
    result = seed(check=False)
    assert result.returncode != 0
    assert "no model version" in result.stderr
    assert seed.versions() == []
