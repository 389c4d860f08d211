"""Reads settings: an environment variable wins over common/stack.env, which wins over the default.

Every service's settings module goes through `env_str`/`env_int`/`env_float`, so one name means
the same value in the gateway, the worker, the model server, docker-compose and k8s.
"""
import os
from functools import lru_cache
from pathlib import Path

STACK_ENV_PATH = Path(__file__).with_name("stack.env")


@lru_cache(maxsize=None)
def read_stack_env(path: Path = STACK_ENV_PATH) -> dict[str, str]:
    """KEY=VALUE lines of stack.env; blank lines and # comments are skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def env_str(name: str, default: str | None = None) -> str:
    if name in os.environ:
        return os.environ[name]
    value = read_stack_env().get(name, default)
    if value is None:
        raise KeyError(f"setting {name} is in neither the environment nor {STACK_ENV_PATH}")
    return value


def env_int(name: str, default: int | None = None) -> int:
    return int(env_str(name, None if default is None else str(default)))


def env_float(name: str, default: float | None = None) -> float:
    return float(env_str(name, None if default is None else str(default)))


def default_redis_url() -> str:
    return env_str("REDIS_URL", f"redis://localhost:{env_int('REDIS_PORT')}/0")
