"""Shared fixtures: the real model, a tiny random-weight model, and real servers."""

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
import pytest

from app.inference.weights import pull_default_model

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("INFERQL_CACHE_DIR", Path.home() / ".cache" / "inferql"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default SmolLM2-135M-Instruct folder (fetched once into the cache)."""
    return pull_default_model(CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A 2-layer random-weight Llama with the real tokenizer: fast, and its output is noise."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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


class ServerProcess:
    """A real `inferql serve` (uvicorn) in a subprocess, on its own port and database."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, key: str | None = None) -> None:
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
            # Tests poll fast; limits are tested with keys that set their own.
            "INFERQL_DEFAULT_RPM": "1000000",
            "INFERQL_DEFAULT_TPM": "100000000",
            "INFERQL_DEFAULT_CONCURRENCY": "10000",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        # The admin key the server prints on first start; pass it in for a restart on the same database.
        self.key = key

    def start(self, timeout: float = 180) -> ServerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=self.env, stdout=self._log, stderr=self._log
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    if self.key is None and self.env.get("INFERQL_AUTH", "on") == "on":
                        self.key = self.first_key()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def first_key(self) -> str:
        """The admin key a first start makes: stdout is no terminal here, so it is in a file."""
        path = Path(self.env["INFERQL_DATA_DIR"]) / "first-admin-key.txt"
        assert path.exists(), f"no first admin key file:\n{self.log()}"
        assert "iq_" not in self.log(), "the key must not reach the log"
        return path.read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def client(self, key: str | None = None):
        """An InferQLClient on this server, with its admin key unless another is given."""
        from app.client import InferQLClient

        return InferQLClient(self.url, api_key=key or self.key)

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
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def real_server(tmp_path_factory, real_model_dir):
    """The real default model behind a real uvicorn server, shared by the e2e tests."""
    server = ServerProcess(tmp_path_factory.mktemp("real-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_model_dir):
    """A real server on the tiny random model: fast, for API behaviour that ignores the text."""
    server = ServerProcess(tmp_path_factory.mktemp("tiny-server"), {"INFERQL_MODEL_PATH": str(tiny_model_dir)}).start()
    yield server
    server.stop()
