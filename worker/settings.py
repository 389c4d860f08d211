"""Every worker setting, read once from the environment (defaults from common/stack.env)."""
import os
import socket
from dataclasses import dataclass

from common.settings import default_redis_url, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    redis_url: str
    tfserving_address: str
    model_name: str
    max_batch_size: int
    max_batch_wait_ms: int
    grpc_timeout_s: float
    grpc_retries: int  # extra attempts after an UNAVAILABLE answer, with exponential backoff
    metrics_port: int
    claim_idle_ms: int  # a job whose worker has not refreshed its claim for this long is taken over
    max_image_pixels: int  # decompression-bomb guard, checked from the header before decoding
    max_decode_bytes: int  # per-image memory bound for decoding and conversion, estimated from the header
    consumer_name: str
    model_status_interval_s: float

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            redis_url=default_redis_url(),
            tfserving_address=env_str("TFSERVING_ADDRESS", f"localhost:{env_int('TFSERVING_GRPC_PORT')}"),
            model_name=env_str("MODEL_NAME"),
            max_batch_size=env_int("MAX_BATCH_SIZE", 32),
            # 0: batches form from the backlog that builds while a Predict call runs (about 9 jobs
            # each at 32 clients either way); waiting 2 ms for more only added 3-4 ms at 1 client
            # (bench-serve A/B, docs/serving.md).
            max_batch_wait_ms=env_int("MAX_BATCH_WAIT_MS", 0),
            grpc_timeout_s=env_float("GRPC_TIMEOUT_S", 5.0),
            grpc_retries=env_int("GRPC_RETRIES", 3),
            metrics_port=env_int("WORKER_METRICS_PORT"),
            claim_idle_ms=env_int("CLAIM_IDLE_MS", 5000),
            max_image_pixels=env_int("MAX_IMAGE_PIXELS", 40_000_000),
            max_decode_bytes=env_int("MAX_DECODE_BYTES", 256 * 2**20),
            consumer_name=env_str("WORKER_NAME", f"{socket.gethostname()}-{os.getpid()}"),
            model_status_interval_s=env_float("MODEL_STATUS_INTERVAL_S", 1.0),
        )

    def __post_init__(self):
        # A live worker refreshes its claims every quarter of this; shorter, and a busy machine
        # could miss a refresh and have a batch in progress taken over.
        if self.claim_idle_ms < 1000:
            raise ValueError(f"CLAIM_IDLE_MS={self.claim_idle_ms} is too short: at least 1000")
