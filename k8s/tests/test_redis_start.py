"""Redis's start script (k8s/base/redis.yaml; docker-compose.yml runs the same) and its
readiness probe, run for real with sh and redis-server on a temporary directory and a free port:
the password reaches redis-server through a private config file and never its argv, clients
without it are refused, the settings (AOF every second, maxmemory, noeviction) are in force,
and a full Redis refuses writes instead of evicting queued jobs."""
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
import redis

from k8s.tests import policy
from k8s.tests.manifests import rendered

PASSWORD = "0123456789abcdef-test-password"
pytestmark = pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"),
                                reason="needs redis-server and redis-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The k8s container's command and args, with the volumes and port swapped for local ones."""
    c = policy.container(policy.workload(rendered("k8s"), "redis"), "redis")
    tmp = tmp_path_factory.mktemp("redis")
    run, data = tmp / "run", tmp / "data"
    run.mkdir()
    data.mkdir()
    port = free_port()
    command = [arg.replace("/run/redis", str(run)) for arg in c["command"]]
    args = [str(data) if arg == "/data" else arg for arg in c["args"]]
    args += ["--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(command + args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": PASSWORD})
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=5)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis did not start: {proc.communicate()[0]}")
            time.sleep(0.05)
    yield {"proc": proc, "port": port, "client": client, "conf": run / "redis.conf", "probe": c}
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_server_is_the_container_process(started):
    """exec: redis-server replaces sh, so it gets SIGTERM (and saves) on pod deletion."""
    pid = started["proc"].pid
    assert Path(f"/proc/{pid}/comm").read_text().strip().startswith("redis-server")


def test_password_is_not_in_argv(started):
    cmdline = Path(f"/proc/{started['proc'].pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline
    assert b"requirepass" not in cmdline


def test_config_file_is_private(started):
    assert stat.S_IMODE(os.stat(started["conf"]).st_mode) == 0o600
    assert started["conf"].read_text() == f'requirepass "{PASSWORD}"\n'


def raw(port, *commands: bytes) -> bytes:
    """What Redis answers to inline commands on a fresh connection (no client retries)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(c + b"\r\n" for c in commands))
        answer = b""
        while answer.count(b"\r\n") < len(commands):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_clients_without_the_password_are_refused(started):
    assert raw(started["port"], b"SET k v").startswith(b"-NOAUTH")
    assert raw(started["port"], b"AUTH wrong").startswith(b"-WRONGPASS")
    assert raw(started["port"], b"AUTH " + PASSWORD.encode(), b"PING") == b"+OK\r\n+PONG\r\n"


def test_settings_are_in_force(started):
    config = started["client"].config_get("*")
    assert int(config["maxmemory"]) == policy.redis_bytes("384mb")
    assert config["maxmemory-policy"] == "noeviction"
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"


def test_readiness_probe_authenticates_from_the_environment(started):
    """The probe's command as written (redis-cli reads REDISCLI_AUTH), pointed at the test port."""
    probe = started["probe"]["readinessProbe"]["exec"]["command"]
    probe = [arg.replace("redis-cli", f"redis-cli -p {started['port']}") for arg in probe]

    def run(**env):
        return subprocess.run(probe, env={"PATH": os.environ["PATH"], **env}, timeout=10,
                              capture_output=True).returncode

    assert run(REDISCLI_AUTH=PASSWORD) == 0
    assert run(REDISCLI_AUTH="wrong") != 0
    assert run() != 0


def test_a_full_redis_refuses_writes_and_keeps_what_it_holds(started):
    """noeviction: past maxmemory a write fails (the gateway answers 503), nothing is evicted."""
    client = started["client"]
    client.set("queued-job", "x")
    client.config_set("maxmemory", client.info("memory")["used_memory"])
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("new-job", "y" * 1_000_000)
        assert client.get("queued-job") == b"x"
    finally:
        client.config_set("maxmemory", str(policy.redis_bytes("384mb")))
