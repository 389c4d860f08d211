"""Every gateway setting, read once from the environment (defaults from common/stack.env)."""
from dataclasses import dataclass

from common.settings import default_redis_url, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    redis_url: str
    max_upload_bytes: int  # whole request body; larger requests get 413
    upload_budget_bytes: int  # request bodies one process holds at once (threads x max_upload would not fit)
    max_images_per_request: int
    result_timeout_s: float  # also each job's deadline: workers drop jobs nobody waits for any more
    queue_maxlen: int  # jobs waiting or in progress; beyond it requests get 503 + Retry-After
    queue_max_bytes: int  # image bytes waiting or in progress, likewise; keep it under Redis' maxmemory
    retry_after_s: int
    bind: str
    web_concurrency: int  # gunicorn worker processes
    threads: int  # gunicorn threads per process; each waits on one request's results
    access_log: bool

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            redis_url=default_redis_url(),
            max_upload_bytes=env_int("MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
            upload_budget_bytes=env_int("UPLOAD_BUDGET_BYTES", 48 * 1024 * 1024),
            max_images_per_request=env_int("MAX_IMAGES_PER_REQUEST", 16),
            result_timeout_s=env_float("RESULT_TIMEOUT_S", 10.0),
            queue_maxlen=env_int("QUEUE_MAXLEN", 1000),
            queue_max_bytes=env_int("QUEUE_MAX_BYTES", 256 * 1024 * 1024),
            retry_after_s=env_int("RETRY_AFTER_S", 1),
            bind=env_str("GUNICORN_BIND", f"0.0.0.0:{env_int('GATEWAY_PORT')}"),
            web_concurrency=env_int("WEB_CONCURRENCY", 2),
            threads=env_int("GUNICORN_THREADS", 32),
            access_log=env_str("GUNICORN_ACCESS_LOG", "0") == "1",
        )
