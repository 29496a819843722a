"""The bench's own server: the tests' harness (tests/harness.py) with every limit lifted."""

from __future__ import annotations

from pathlib import Path

from tests.harness import ServerProcess

# Auth stays on (it is part of the API path measured); the bootstrap admin key gets limits
# that a benchmark never reaches, so no request is throttled.
BENCH_ENV = {
    "INFERQL_HOST": "127.0.0.1",
    "INFERQL_DEFAULT_RPM": "1000000",
    "INFERQL_DEFAULT_TPM": "1000000000",
    "INFERQL_DEFAULT_CONCURRENCY": "10000",
    "INFERQL_MAX_QUEUED_JOBS": "100000",
    # 64 streams open 64 websockets from one address at once
    "INFERQL_MAX_WS_UNAUTHENTICATED_PER_ADDRESS": "100000",
    "INFERQL_MAX_WS_PER_KEY": "100000",
}


def bench_server(workdir: Path, model_path: Path | None, threads: int, **extra_env: str) -> ServerProcess:
    """A server on a free port in `workdir`, not started: `.spawn()`, then `await .wait_ready()`."""
    return ServerProcess(workdir, {**BENCH_ENV, **extra_env}, model_path=model_path, threads=threads,
                         stop_grace=30)
