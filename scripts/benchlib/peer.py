"""The peer: `transformers serve MODEL --continuous-batching` (--peer; pip install -e '.[bench]'),
driven through its OpenAI streaming chat completions as a third streaming mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import free_port, stop_process

from .streams import Phase, Stream, run_phase


async def peer_stream(http: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int) -> Stream:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t_submit = time.perf_counter()
    first = None
    chunks = 0
    async with http.stream("POST", base_url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            choices = json.loads(data).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    return Stream(t_submit=t_submit, t_first=first, t_done=time.perf_counter(), tokens=chunks)


class Peer:
    """`transformers serve MODEL --continuous-batching` on a free port."""

    def __init__(self, workdir: Path, model_path: Path, threads: int, dtype: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model_path)
        self.dtype = dtype
        self.log_path = workdir / f"peer-{self.port}.log"
        self.env = {**os.environ}
        if threads > 0:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", self.model, "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        if self.dtype != "default":
            cmd += ["--dtype", self.dtype]
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=self._log)

    async def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"transformers serve exited early:\n{self.log_path.read_text(errors='replace')[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.5)
        raise TimeoutError("transformers serve was not ready")

    async def phase(self, http: httpx.AsyncClient, concurrency: int, prompts: list[str], max_tokens: int) -> Phase:
        streams = await run_phase(concurrency, prompts,
                                  lambda p: peer_stream(http, self.url, self.model, p, max_tokens))
        return Phase("peer", concurrency, streams, 0)

    def stop(self) -> None:
        stop_process(self.proc, 30)
        if self._log is not None:
            self._log.close()
