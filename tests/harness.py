"""A real InferQL server in a subprocess, shared by the tests (tests/conftest.py) and the
benchmark (scripts/bench.py).

`ServerProcess` runs `python -m app.cli serve` on a free port with its own SQLite file and
data folder (INFERQL_DATA_DIR). With auth on, a first start on a fresh database writes the
first admin key into `<data dir>/first-admin-key.txt` (stdout is no terminal here); the
harness reads it into `.key` once the server is ready.

Two ways to wait for it:
  * `start()` spawns and blocks until /readyz answers (the tests);
  * `spawn()`, then `await wait_ready()` (the benchmark loads its own model meanwhile).

Needs nothing beyond the app's own dependencies (no pytest).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.jobs.keys import FIRST_KEY_FILE

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("INFERQL_CACHE_DIR", Path.home() / ".cache" / "inferql"))

# Tests poll fast and the bench never waits on a quota; limits are tested with keys (or
# servers) that set their own.
LIFTED_LIMITS = {
    "INFERQL_DEFAULT_RPM": "1000000",
    "INFERQL_DEFAULT_TPM": "100000000",
    "INFERQL_DEFAULT_CONCURRENCY": "10000",
}


async def wait_until(check, what: str, timeout: float = 60.0, interval: float = 0.1):
    """Polls `check` (sync or async) until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; a no-op for a process already gone."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """A real `inferql serve` (uvicorn) in a subprocess, on its own port and database.

    `env` is laid over the defaults (so INFERQL_DATABASE_URL / INFERQL_DATA_DIR from an
    earlier server restart on the same data); `model_path` and `threads` (> 0) set
    INFERQL_MODEL_PATH and INFERQL_TORCH_THREADS unless `env` does. Pass `key` for a
    restart on a database whose first admin key was already handed out.
    """

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, key: str | None = None, *,
                 model_path: Path | str | None = None, threads: int = 0, stop_grace: float = 20) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "INFERQL_PORT": str(self.port),
            "INFERQL_DATABASE_URL": f"sqlite:///{tmp / f'inferql-{self.port}.db'}",
            "INFERQL_DATA_DIR": str(tmp / f"data-{self.port}"),
            "INFERQL_CACHE_DIR": str(CACHE_DIR),
            "INFERQL_LOG_LEVEL": "warning",
            **LIFTED_LIMITS,
            **({"INFERQL_MODEL_PATH": str(model_path)} if model_path is not None else {}),
            **({"INFERQL_TORCH_THREADS": str(threads)} if threads > 0 else {}),
            **(env or {}),
        }
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen | None = None
        # The admin key the server writes on first start; pass it in for a restart on the same database.
        self.key = key

    # ---- starting -------------------------------------------------------------------------

    @property
    def auth_on(self) -> bool:
        return self.env.get("INFERQL_AUTH", "on") == "on"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "app.cli", "serve"]

    def spawn(self) -> ServerProcess:
        """Starts the process and returns at once; `wait_ready()` (async) waits for it."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=self._log, stderr=self._log)
        return self

    def start(self, timeout: float = 180) -> ServerProcess:
        """Spawns and blocks until /readyz answers 200; reads the first admin key."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self._ready()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout:.0f}s:\n{self.log()}")

    async def wait_ready(self, timeout: float = 600) -> ServerProcess:
        """After `spawn()`: waits without blocking the event loop until /readyz answers 200."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if (await http.get(self.url + "/readyz")).status_code == 200:
                        return self._ready()
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout:.0f}s:\n{self.log()}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{self.log()}")

    def _ready(self) -> ServerProcess:
        if self.key is None and self.auth_on:
            self.key = self.first_key()
        return self

    def first_key(self) -> str:
        """The admin key a first start makes: stdout is no terminal here, so it is in a file."""
        path = Path(self.env["INFERQL_DATA_DIR"]) / FIRST_KEY_FILE
        if not path.exists():
            raise AssertionError(f"no first admin key file:\n{self.log()}")
        if "iq_" in self.log():
            raise AssertionError("the key must not reach the log")
        return path.read_text().strip()

    # ---- using it -------------------------------------------------------------------------

    def log(self, tail: int = 20000) -> str:
        """The last `tail` characters of the server's stdout + stderr."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def client(self, key: str | None = None, **kwargs):
        """An InferQLClient on this server, with its admin key unless another is given."""
        from app.client import InferQLClient

        return InferQLClient(self.url, api_key=key or self.key, **kwargs)

    def sql(self, query: str, *args) -> list[tuple]:
        """Rows straight from this server's SQLite file (what is really stored)."""
        path = self.env["INFERQL_DATABASE_URL"].removeprefix("sqlite:///")
        with sqlite3.connect(path, timeout=30) as conn:
            return conn.execute(query, args).fetchall()

    def create_key(self, name: str, *args: str) -> str:
        """`inferql keys create` against this server's database; returns the new key."""
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", "create", "--name", name, *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        stop_process(self.proc, self.stop_grace)
        if getattr(self, "_log", None) is not None:
            self._log.close()


# ---- the scaled-out roles (README "Scaling out") --------------------------------------------


class ApiReplica(ServerProcess):
    """`inferql serve --api-only`: the API without the model's weights."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "app.cli", "serve", "--api-only"]


class WorkerProcess(ServerProcess):
    """`inferql worker`: ready when its /readyz answers on INFERQL_WORKER_PORT (self.port)."""

    def __init__(self, tmp: Path, env: dict[str, str], **kwargs) -> None:
        super().__init__(tmp, env, key="workers need no key", **kwargs)
        self.env["INFERQL_WORKER_PORT"] = str(self.port)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "app.cli", "worker"]

    def jobs_started(self) -> int:
        """The worker's `inferql_worker_jobs_started_total`."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        line = next(l for l in text.splitlines() if l.startswith("inferql_worker_jobs_started_total"))
        return int(float(line.split()[1]))
