"""All configuration, from environment variables prefixed INFERQL_ (or a .env file).

Every default runs on one laptop: SQLite under ./data, the in-process runner, the
default model fetched into ~/.cache/inferql on first start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQL_", env_file=".env", extra="ignore")

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object a line, with request_id and job_id

    database_url: str = "sqlite:///./data/inferql.db"

    # Model
    model_path: Path | None = Field(
        default=None, description="a local HF-format causal LM folder to serve instead of the default model"
    )
    cache_dir: Path = Path.home() / ".cache" / "inferql"  # the default model is kept here
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    torch_threads: int = 0        # 0 = torch's default (one per core)
    gil_switch_interval: float = 0.0005  # seconds; Python's default 0.005 makes requests wait on the engine
    ws_compression: bool = False  # permessage-deflate on websockets: a token message is ~200 bytes, and
    #   compressing each cost ~0.25 ms of the event loop's CPU (shared with the model) to save ~100 bytes

    # Access: API keys (Authorization: Bearer <key>). "off" is for trusted local use only.
    auth: Literal["on", "off"] = "on"
    default_rpm: int = 600            # requests per minute, for keys created without --rpm
    default_tpm: int = 200_000        # tokens per minute (prompt + completion), without --tpm
    default_concurrency: int = 64     # generations queued or running at once, without --concurrency
    default_max_priority: int = 50    # highest job priority, without --max-priority (admin keys: 100)
    rate_window_seconds: int = 60     # the moving window rpm/tpm are counted over ("per minute")
    key_cache_seconds: float = 1.0    # how long a key lookup is reused: a revocation takes up to this long

    # Engine and queue
    max_batch_size: int = 16      # generations decoded together in one forward pass
    max_queued_jobs: int = 256    # beyond this, new work is refused with OVERLOADED
    max_queued_classifications: int = 16  # classifications waiting for the engine; beyond, OVERLOADED
    max_prompt_chars: int = 32_000
    max_new_tokens: int = 2048

    # Engine speed (app/inference; README "Performance")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # weights on the fast path; auto:
    #   bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32. Logits are float32.
    fast_path: Literal["auto", "off"] = "auto"  # auto: Llama-family models run the lean forward; off: HF's
    prefill_chunk: int = 128            # prompt tokens fed per step while other generations decode
    stream_interval_ms: int = Field(default=50, ge=0, le=1000)  # a running generation's tokens reach the
    #   event loop at most this often (its first token and its end at once); 0 = after every decode step
    stream_messages_per_s: int = Field(default=160, ge=0, le=100_000)  # with many generations running, the
    #   interval stretches to running / this, so their token messages stay under this many a second; 0 = off
    prefix_cache_tokens: int = 4096     # KV of recent prompt prefixes kept for reuse; 0 = off
    int8_small_batch: Literal["auto", "on", "off"] = "auto"  # int8 weight copies for decode steps of few
    #   rows (bandwidth-bound); auto: 1-row steps (not timed, so replicas agree), on: up to 4 rows
    packed_weights: Literal["auto", "off"] = "auto"  # auto: the fast path's matrices prepacked for oneDNN
    #   on CPU (inference/onednn.py; a layer's 1-row matmuls 1.7x faster); off: plain F.linear weights
    fp16_matrices: Literal["auto", "on", "off"] = "auto"  # a float32 model's matrices kept in float16 and
    #   multiplied in float32 by fbgemm on CPU (inference/fbgemm.py: half the bytes); auto: where fbgemm runs
    decode_attention: Literal["auto", "sdpa", "matmuls"] = "auto"  # a decode step's attention: torch's
    #   SDPA, or two float32 matmuls; auto: SDPA on a GPU and for bfloat16 on a CPU with AMX (fastllama.py)
    native_step: Literal["auto", "off"] = "auto"  # auto: the int8 copies' decode steps in one native call
    #   (inference/native.py, compiled at first use with the machine's C compiler); off: through torch

    # Answers below this confidence score are flagged needsReview
    review_threshold: float = 0.5

    # Scaling out (README "Scaling out"). The defaults are one process with everything in it.
    role: Literal["all", "api", "worker"] = "all"  # api: no model weights (`serve --api-only`);
    #   worker: the engine and the claim loop (`inferql worker`)
    # Live job events, cancel messages and the rpm/tpm windows across processes. With a
    # PostgreSQL database_url it also makes the database the job queue (claims and leases).
    redis_url: str | None = None
    redis_prefix: str = "inferql:"  # every key and channel of this deployment starts with it
    lease_seconds: float = 30.0   # a worker's claim on a job, renewed every third of it; a worker
    #   silent this long has its jobs re-queued by any process
    worker_port: int = 9100       # `inferql worker`: /metrics and /readyz only
    worker_id: str | None = None  # names this process in claims and logs; default: host-pid-random

    # Jobs
    max_attempts: int = 3         # a job whose worker died this many times ends FAILED (WORKER_LOST)
    retention_days: float = 30.0  # finished jobs older than this are removed by `inferql jobs purge`

    # Webhooks (Standard Webhooks signatures)
    # "whsec_...": signs webhooks of jobs made without a key (auth off); each key signs its own
    # with its own secret. None = generated once into data_dir.
    webhook_secret: SecretStr | None = None
    webhook_retry_delays: str = "5,30,120,600,1800"  # seconds between attempts
    webhook_timeout: float = 10.0  # seconds for a whole attempt: resolve, connect, send, read the answer
    # Lets webhooks reach loopback, private, link-local... addresses (the server's own network).
    # For local development and tests only.
    webhook_allow_private: bool = False
    data_dir: Path = Path("data")  # where a generated webhook secret is kept

    @property
    def retry_delays(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_delays.split(",") if x.strip()]

    # GraphQL transport and document limits
    graphiql: bool | None = None       # default: on, except in production
    introspection: bool | None = None  # default: on, except in production
    max_query_depth: int = 12
    max_aliases: int = 20
    max_query_tokens: int = 2000
    max_directives: int = 20
    # Static cost of an operation: each field counts 1, times the `first` of every list field
    # above it (`jobs(first: 100) { nodes { id } }` costs 201); a costlier one is refused.
    max_query_cost: int = 5000
    max_body_bytes: int = 1_000_000    # bigger HTTP bodies get 413; websocket frames are capped likewise
    max_subscriptions_per_connection: int = 8
    connection_init_wait_timeout: float = 10.0  # both websocket protocols: no connection_init by then: 4408
    max_ws_per_key: int = 128          # open websockets of one API key; more are closed with 4429
    max_ws_unauthenticated_per_address: int = 32  # websockets of one client address not yet authenticated
    allowed_origins: list[str] = []  # extra browser Origins allowed to open websockets (same-origin always is)

    @property
    def graphiql_enabled(self) -> bool:
        return self.graphiql if self.graphiql is not None else self.env != "production"

    @property
    def introspection_enabled(self) -> bool:
        return self.introspection if self.introspection is not None else self.env != "production"
