#!/usr/bin/env python3
"""InferQL benchmark: the GraphQL `generate` subscription against the engine called directly.

In one run it drives N concurrent `generate` subscriptions over real websockets against a
running server (its own `inferql serve` subprocess unless --url is given) and, in
alternating phases, the same engine in-process on the same prompts. It prints aggregate
tokens/s, time to first token (TTFT) p50/p95, the ratios between them and a PASS/MISS line
per target. Timings never fail the run: it exits 0 whatever the figures are, and non-zero
only when the benchmark itself cannot run (no server, a failed stream).

Fairness on a small, shared machine:
  * the server and the in-process engine never compute at the same time: for each round
    and each concurrency the API phase and the direct phase run back to back (which one
    goes first alternates), so a ratio compares two phases under the same machine load;
    the in-process engine is started right before its phase and stopped right after it,
    and the server's engine thread sleeps on a condition variable while idle;
  * both modes get the same prompts in the same order, greedy (temperature 0), no stop
    strings, the same maxTokens; the direct side gets pre-tokenized prompts (the server
    tokenizes in its request path, so that cost is counted against the API);
  * tokens are counted as received (a greedy answer may end early on end-of-sequence);
  * one warm-up generation per mode and concurrency precedes the measured rounds;
  * figures are medians over rounds (tok/s) or percentiles over every stream of every
    round (TTFT). Absolute numbers follow the machine's load; the ratios are the point.

With --peer it also starts `transformers serve MODEL --continuous-batching` (the optional
`bench` extra: pip install -e '.[bench]') on a free port and runs the same prompts through
its OpenAI streaming chat completions, as a third mode in the same alternation.

It also prints the machine's own limits (read bandwidth, GEMM rate, measured here first),
what fraction of them the engine reaches, and the fast path's fidelity: over 20 fixed
prompts, greedy agreement and mean |d logprob| against a float32 eager reference.

Definitions:
  aggregate tok/s = tokens received by all streams of a phase / wall time from the first
                    submit to the last completion. A phase at concurrency c runs
                    max(c, --requests) generations through c closed-loop workers.
  TTFT            = API: from sending the `subscribe` message to the first TokenGenerated
                    (the websocket connect + connection_init before it is shown apart);
                    direct: from engine.submit() to the first TokenStep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import websockets  # noqa: E402

PROMPTS = [
    "Explain how a bicycle stays upright while it moves.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle for a ten-year-old.",
    "What are the main differences between a cat and a dog as pets?",
    "Give some advice to someone starting to learn the piano.",
    "Explain why the sky is blue.",
    "Describe a busy market on a Saturday morning.",
    "What should a beginner know before planting a vegetable garden?",
]

SUBSCRIPTION = """
subscription Bench($input: GenerationInput!) {
  generate(input: $input) {
    __typename
    ... on TokenGenerated { index text }
    ... on GenerationCompleted { result { usage { completionTokens } } }
  }
}
"""

TARGET_OVERHEAD = 0.95     # API tok/s >= 0.95 x direct, at 1, 16 and 64 streams
OVERHEAD_STREAMS = (1, 16, 64)
TARGET_TTFT_MS = 50.0      # API TTFT <= direct TTFT + 50 ms, at 1 stream
TARGET_PEER = {1: 2.5, 16: 3.0}   # InferQL (API) tok/s >= this x the peer's
TARGET_PEER_TTFT = 0.5     # InferQL TTFT p50 <= 0.5 x the peer's, at 16 streams
TARGET_BANDWIDTH = 0.5     # weight bytes read per second at 1 stream >= 50 % of the measured read bandwidth
TARGET_AGREEMENT = 0.97    # fast path vs float32 eager reference: greedy agreement
TARGET_DLOGPROB = 0.05     # ... and mean |d logprob|

FIDELITY_PROMPTS = PROMPTS + [
    "What is the capital of France?",
    "List three uses of copper.",
    "Translate 'good morning' into French and Spanish.",
    "Why do leaves change colour in autumn?",
    "Write a haiku about the sea.",
    "How does a refrigerator keep food cold?",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Give three tips for a job interview.",
    "What causes the seasons on Earth?",
    "Explain what a prime number is.",
    "Suggest a name for a friendly robot.",
]


# ---- results ------------------------------------------------------------------------------


@dataclass
class Stream:
    t_submit: float            # subscribe message sent / engine.submit()
    t_first: float | None      # first token received
    t_done: float              # completion received
    tokens: int                # tokens received
    t_call: float | None = None  # API only: before the websocket connect

    @property
    def ttft_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_submit) * 1000


@dataclass
class Phase:
    mode: str
    concurrency: int
    streams: list[Stream]
    max_batch: int

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def wall_s(self) -> float:
        return max(s.t_done for s in self.streams) - min(s.t_submit for s in self.streams)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Summary:
    mode: str
    concurrency: int
    tok_s: float               # median over rounds
    ttft_p50: float | None
    ttft_p95: float | None
    tokens: int                # median tokens per round
    max_batch: int             # largest decode batch seen in any round
    rounds: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(phases: list[Phase]) -> Summary:
    ttfts = [s.ttft_ms for p in phases for s in p.streams if s.ttft_ms is not None]
    per_round = [p.tok_s for p in phases]
    return Summary(
        mode=phases[0].mode,
        concurrency=phases[0].concurrency,
        tok_s=statistics.median(per_round),
        ttft_p50=percentile(ttfts, 0.50),
        ttft_p95=percentile(ttfts, 0.95),
        tokens=int(statistics.median(p.tokens for p in phases)),
        max_batch=max(p.max_batch for p in phases),
        rounds=per_round,
    )


# ---- closed-loop driver -------------------------------------------------------------------


async def run_phase(concurrency: int, prompts: list, one) -> list[Stream]:
    """Run every prompt through `concurrency` workers; each worker runs one stream at a time."""
    work = iter(prompts)
    streams: list[Stream] = []

    async def worker() -> None:
        for item in work:  # a shared iterator: no await between next() calls, so no races
            streams.append(await one(item))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return streams


def phase_prompts(concurrency: int, requests: int) -> list[str]:
    n = max(concurrency, requests)
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# ---- the API side -------------------------------------------------------------------------

# The project's client (app/client.py) opens the socket, sends connection_init and then the
# subscribe message inside one generator. To time TTFT from the subscribe message itself, its
# module-level `websockets` is swapped (in this process only) for one whose connections note
# when `subscribe` goes out, in the calling task's context.
_sent: contextvars.ContextVar[dict] = contextvars.ContextVar("bench_sent")


class _TimedSocket:
    def __init__(self, ws) -> None:
        self._ws = ws

    async def send(self, message: str) -> None:
        if '"type": "subscribe"' in message or '"type": "start"' in message:
            with contextlib.suppress(LookupError):
                _sent.get()["subscribe"] = time.perf_counter()
        await self._ws.send(message)

    async def recv(self):
        return await self._ws.recv()


class _TimedConnect:
    def __init__(self, *args, **kwargs) -> None:
        self._cm = websockets.connect(*args, **kwargs)

    async def __aenter__(self) -> _TimedSocket:
        return _TimedSocket(await self._cm.__aenter__())

    async def __aexit__(self, *exc):
        return await self._cm.__aexit__(*exc)


def install_client_timing() -> None:
    import app.client

    app.client.websockets = types.SimpleNamespace(
        connect=_TimedConnect, ConnectionClosed=websockets.ConnectionClosed
    )


async def api_stream(client, prompt: str, max_tokens: int) -> Stream:
    sent: dict[str, float] = {}
    _sent.set(sent)
    variables = {"input": {"prompt": prompt, "maxTokens": max_tokens, "temperature": 0}}
    t_call = time.perf_counter()
    first = done = None
    tokens = 0
    completion_tokens = None
    async for data in client.subscribe(SUBSCRIPTION, variables):
        event = data["generate"]
        kind = event["__typename"]
        if kind == "TokenGenerated":
            tokens += 1
            if first is None:
                first = time.perf_counter()
        elif kind == "GenerationCompleted":
            done = time.perf_counter()
            completion_tokens = event["result"]["usage"]["completionTokens"]
        elif kind in ("GenerationFailed", "GenerationCancelled"):
            raise RuntimeError(f"generation ended with {kind}")
    if done is None:
        raise RuntimeError("the subscription ended without GenerationCompleted")
    if completion_tokens is not None and completion_tokens != tokens:
        print(f"  warning: received {tokens} tokens, the server counted {completion_tokens}", flush=True)
    return Stream(t_submit=sent.get("subscribe", t_call), t_first=first, t_done=done, tokens=tokens, t_call=t_call)


_HIST = re.compile(r'^inferql_engine_batch_size_steps\{size="(\d+)"\}\s+([0-9.eE+]+)\s*$', re.M)


async def batch_histogram(http: httpx.AsyncClient, base_url: str) -> dict[int, float]:
    resp = await http.get(base_url + "/metrics")
    resp.raise_for_status()
    return {int(size): float(count) for size, count in _HIST.findall(resp.text)}


async def api_phase(client, http, base_url: str, concurrency: int, prompts: list[str], max_tokens: int) -> Phase:
    before = await batch_histogram(http, base_url)
    streams = await run_phase(concurrency, prompts, lambda p: api_stream(client, p, max_tokens))
    after = await batch_histogram(http, base_url)
    sizes = [size for size, count in after.items() if count > before.get(size, 0.0)]
    return Phase("API", concurrency, streams, max(sizes, default=0))


# ---- the direct side ----------------------------------------------------------------------


async def direct_stream(engine, ids: list[int], max_tokens: int) -> Stream:
    from app.inference.types import Finished, SamplingParams, TokenStep

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t_submit = time.perf_counter()
    handle = engine.submit(ids, params)
    first = None
    tokens = 0
    async for out in handle:
        if isinstance(out, TokenStep):
            tokens += 1
            if first is None:
                first = time.perf_counter()
        elif isinstance(out, Finished):
            if out.error:
                raise RuntimeError(f"direct generation failed: {out.error}")
            break
    return Stream(t_submit=t_submit, t_first=first, t_done=time.perf_counter(), tokens=tokens)


class Direct:
    """The model loaded once in-process; an Engine runs only while direct phases run."""

    def __init__(self, lm, max_batch_size: int) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self._ids: dict[str, list[int]] = {}
        self.engine = None

    def ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids:
            self._ids[prompt] = self.lm.encode_chat([{"role": "user", "content": prompt}])
        return self._ids[prompt]

    async def start(self) -> None:
        from app.inference.engine import Engine

        self.engine = Engine(self.lm, max_batch_size=self.max_batch_size)
        self.engine.start()

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    async def phase(self, concurrency: int, prompts: list[str], max_tokens: int) -> Phase:
        from app.inference.types import EngineStats

        self.engine.stats = EngineStats()
        items = [self.ids(p) for p in prompts]
        streams = await run_phase(concurrency, items, lambda ids: direct_stream(self.engine, ids, max_tokens))
        return Phase("direct", concurrency, streams, self.engine.stats.max_batch_size)


# ---- the peer: transformers serve --continuous-batching -----------------------------------


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
        Server.stop(self)  # same terminate/kill/close


# ---- the machine's limits and the engine's fidelity ---------------------------------------


def machine_limits(dtype, quick: bool) -> dict[str, float]:
    """Read bandwidth (GB/s: sum over a buffer far larger than the caches) and GEMM rate
    (GFLOP/s: 1024^3 matmuls) in float32 and in `dtype`; best of several tries, since the
    machine is shared and a slow try says more about the neighbours than about the machine."""
    import torch

    tries = 3 if quick else 8
    n = (64 if quick else 256) * 1024 * 1024 // 4
    buf = torch.rand(n)
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        buf.sum()
        best = max(best, n * 4 / (time.perf_counter() - t) / 1e9)
    del buf
    out = {"bandwidth_gbs": best}
    for dt in dict.fromkeys([torch.float32, dtype]):
        a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        rate = 0.0
        for _ in range(tries):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            rate = max(rate, 4 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9)
        out[f"gemm_{str(dt).removeprefix('torch.')}_gflops"] = rate
    return out


def weight_bytes_per_token(lm) -> tuple[int, int]:
    """(bytes of weights a decode step reads, multiply-adds per token) on the engine's path."""
    fast = lm.fast_weights()
    if fast is None:
        params = [p for n, p in lm.model.named_parameters() if "embed" not in n or lm.model.config.tie_word_embeddings]
        return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)
    tensors = [t for layer in fast.layers for t in layer if t is not None] + [fast.norm, fast.head]
    macs = sum(t.numel() for t in tensors if t.dim() == 2)
    return sum(t.numel() * t.element_size() for t in tensors), macs



# ---- the server subprocess ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path, model_path: Path | None, threads: int, **extra_env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "INFERQL_PORT": str(self.port),
            "INFERQL_HOST": "127.0.0.1",
            "INFERQL_DATABASE_URL": f"sqlite:///{workdir / f'bench-{self.port}.db'}",
            "INFERQL_LOG_LEVEL": "warning",
            "INFERQL_DATA_DIR": str(workdir / "data"),
            # Auth stays on (it is part of the API path measured); the bootstrap admin key gets
            # limits that a benchmark never reaches, so no request is throttled.
            "INFERQL_DEFAULT_RPM": "1000000",
            "INFERQL_DEFAULT_TPM": "1000000000",
            "INFERQL_DEFAULT_CONCURRENCY": "10000",
            "INFERQL_MAX_QUEUED_JOBS": "100000",
            # 64 streams open 64 websockets from one address at once
            "INFERQL_MAX_WS_UNAUTHENTICATED_PER_ADDRESS": "100000",
            "INFERQL_MAX_WS_PER_KEY": "100000",
            **extra_env,
        }
        if model_path is not None:
            self.env["INFERQL_MODEL_PATH"] = str(model_path)
        if threads > 0:
            self.env["INFERQL_TORCH_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.key: str | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=self.env, stdout=self._log, stderr=self._log
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.url + "/readyz")).status_code == 200:
                        # With auth on, a first start on a fresh database writes an admin key
                        # into the data folder (stdout is no terminal here).
                        key_file = Path(self.env["INFERQL_DATA_DIR"]) / "first-admin-key.txt"
                        self.key = key_file.read_text().strip() if key_file.exists() else None
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


# ---- jobs: submission, polling, auth overhead --------------------------------------------

SUBMIT = """mutation($input: GenerationInput!) { submitGeneration(input: $input) { id status } }"""
POLL = """query($id: ID!) { job(id: $id) { id status } }"""


class LeanClient:
    """GraphQL over one keep-alive HTTP/1.1 connection, with as little client work as can be.

    The job section's load generator: on a 2-core machine whose cores the engine keeps
    busy, httpx's ~1.5 ms of CPU per request (measured) competes with the server it is
    timing. A real client runs on another machine; this one costs ~0.1 ms."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self._host, port = base_url.removeprefix("http://").split(":")
        self._port = int(port)
        self._auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> LeanClient:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        self._writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def __aexit__(self, *exc) -> None:
        self._writer.close()

    async def execute(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        self._writer.write(
            (f"POST /graphql HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n{self._auth}"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        reply = json.loads(await self._reader.readexactly(length))
        if reply.get("errors") or not head.startswith(b"HTTP/1.1 200"):
            status = head.split(b"\r\n", 1)[0].decode()
            raise RuntimeError(f"{status}: {reply.get('errors')}")
        return reply["data"]


async def timed(coro) -> float:
    t = time.perf_counter()
    await coro
    return (time.perf_counter() - t) * 1000


async def jobs_section(base_url: str, api_key: str | None, saturate: int, submitters: int, per_submitter: int,
                       polls: int, client_kind: str = "lean") -> None:
    """Submission latency while the engine is saturated, jobs accepted per second, poll latency."""
    from app.client import InferQLClient

    def client_for():
        return LeanClient(base_url, api_key) if client_kind == "lean" else InferQLClient(base_url, api_key=api_key)

    long_input = {"prompt": "Write a long story about the sea.", "maxTokens": 400}
    cpu0, requests = time.process_time(), saturate + per_submitter * (1 + submitters) + submitters + polls + 2
    async with client_for() as client:
        for _ in range(saturate):
            await client.execute(SUBMIT, {"input": long_input})
        await asyncio.sleep(1.0)  # let the long jobs start: the engine is now busy decoding
        # One client alone first: the server's time per submission, without queueing behind others.
        alone = [await timed(client.execute(SUBMIT, {"input": {"prompt": "Say hi.", "maxTokens": 1}}))
                 for _ in range(per_submitter)]
        latencies: list[float] = []

        async def submitter(own) -> None:
            for _ in range(per_submitter):
                latencies.append(await timed(own.execute(SUBMIT, {"input": {"prompt": "Say hi.", "maxTokens": 1}})))

        async with contextlib.AsyncExitStack() as stack:
            # Every submitter connects (and sends one request) before the clock starts.
            own = [await stack.enter_async_context(client_for()) for _ in range(submitters)]
            await asyncio.gather(*(c.execute("{ models { id } }") for c in own))
            t0 = time.perf_counter()
            await asyncio.gather(*(submitter(c) for c in own))
            wall = time.perf_counter() - t0
        job_id = (await client.execute(SUBMIT, {"input": {"prompt": "Hi", "maxTokens": 1}}))["submitGeneration"]["id"]
        poll_ms = [await timed(client.execute(POLL, {"id": job_id})) for _ in range(polls)]
        running = (await client.execute("{ jobs(status: RUNNING, first: 100) { nodes { id } } }"))["jobs"]["nodes"]
    print(f"\njobs: {submitters} concurrent submitters x {per_submitter}, engine busy with {len(running)} running"
          f" generations of {saturate} queued long ones")
    print(f"  submitGeneration, one client alone: p50 {percentile(alone, 0.5):.1f} ms"
          f"  p99 {percentile(alone, 0.99):.1f} ms")
    print(f"  submitGeneration p50 {percentile(latencies, 0.5):.1f} ms  p99 {percentile(latencies, 0.99):.1f} ms"
          f"  ({len(latencies) / wall:.0f} jobs accepted/s)   {verdict(percentile(latencies, 0.99) < 100)} p99 < 100 ms")
    print(f"  job(id) poll p50 {percentile(poll_ms, 0.5):.1f} ms  p95 {percentile(poll_ms, 0.95):.1f} ms"
          f"   {verdict(percentile(poll_ms, 0.5) < 10)} p50 < 10 ms")
    print(f"  (load generator: {'LeanClient' if client_kind == 'lean' else 'InferQLClient (httpx)'},"
          f" {(time.process_time() - cpu0) * 1000 / requests:.2f} ms of this process's CPU per request)")


async def auth_overhead(workdir: Path, model_path: Path | None, threads: int, polls: int, rounds: int) -> None:
    """job(id) p50 with auth + rate limiting and without, on two idle servers, alternating."""
    from app.client import InferQLClient

    on = Server(workdir, model_path, threads)
    off = Server(workdir, model_path, threads, INFERQL_AUTH="off")
    try:
        on.start()
        off.start()
        await on.wait_ready()
        await off.wait_ready()
        samples: dict[str, list[float]] = {"auth on": [], "auth off": []}
        async with InferQLClient(on.url, api_key=on.key) as a, InferQLClient(off.url) as b:
            ids = {}
            for name, client in (("auth on", a), ("auth off", b)):
                ids[name] = (await client.execute(SUBMIT, {"input": {"prompt": "Hi", "maxTokens": 1}}))[
                    "submitGeneration"]["id"]
                for _ in range(20):  # warm-up
                    await client.execute(POLL, {"id": ids[name]})
            for _ in range(rounds):
                for name, client in (("auth on", a), ("auth off", b)):
                    samples[name] += [await timed(client.execute(POLL, {"id": ids[name]})) for _ in range(polls)]
        p_on, p_off = percentile(samples["auth on"], 0.5), percentile(samples["auth off"], 0.5)
        print(f"\nauth + rate limiting on job(id): p50 {p_on:.2f} ms with, {p_off:.2f} ms without"
              f" (+{p_on - p_off:.2f} ms, {p_on / p_off:.2f}x), {len(samples['auth on'])} polls each, alternating")
    finally:
        on.stop()
        off.stop()


# ---- report -------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def ratio_of_rounds(num: Summary, den: Summary) -> tuple[float, list[float]]:
    """Median over rounds of the per-round ratio (phases of one round ran close in time)."""
    ratios = [a / b if b else 0.0 for a, b in zip(num.rounds, den.rounds)]
    return statistics.median(ratios), ratios


def report(summaries: dict[tuple[str, int], Summary], concurrency: list[int], connect_ms: list[float],
           modes: list[str], machine: dict[str, float] | None = None, engine_facts: dict | None = None,
           fidelity=None) -> None:
    print()
    print(f"{'mode':<8}{'streams':>8}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'tokens':>8}"
          f"{'max batch':>11}   tok/s per round")
    for c in concurrency:
        for mode in modes:
            s = summaries[(mode, c)]
            rounds = " ".join(f"{v:.1f}" for v in s.rounds)
            print(f"{mode:<8}{c:>8}{s.tok_s:>10.1f}{fmt_ms(s.ttft_p50):>10}{fmt_ms(s.ttft_p95):>10}"
                  f"{s.tokens:>8}{s.max_batch:>11}   {rounds}")
    print("(tok/s: aggregate, median over rounds; TTFT in ms over all streams of all rounds;"
          " tokens: per phase, median over rounds; max batch: largest decode batch seen)")
    if connect_ms:
        print(f"(API TTFT starts at the subscribe message; the websocket connect + connection_init before it"
              f" took p50 {percentile(connect_ms, 0.5):.1f} ms, p95 {percentile(connect_ms, 0.95):.1f} ms)")
    if len(concurrency) > 1:
        print("curve (aggregate tok/s by streams): " + "; ".join(
            f"{mode} " + " ".join(f"{c}:{summaries[(mode, c)].tok_s:.0f}" for c in concurrency) for mode in modes))

    print()
    print("Targets (ratios: median over rounds of the per-round ratio; per-round values in brackets)")
    lines: list[tuple[str, str, str]] = []

    def per_round(values: list[float], unit: str = "x") -> str:
        return "[" + " ".join(f"{v:.2f}{unit}" for v in values) + "]"

    def plural(c: int) -> str:
        return f"{c} stream{'s' if c > 1 else ''}"

    for c in concurrency:
        ratio, rounds = ratio_of_rounds(summaries[("API", c)], summaries[("direct", c)])
        targeted = c in OVERHEAD_STREAMS
        goal = f"(>= {TARGET_OVERHEAD}x)" if targeted else "(no target at this concurrency)"
        lines.append((f"API/direct tok/s at {plural(c)}", f"{ratio:.3f}x {goal} {per_round(rounds)}",
                      verdict(ratio >= TARGET_OVERHEAD if targeted else None)))
    if 1 in concurrency:
        api, direct = summaries[("API", 1)], summaries[("direct", 1)]
        if api.ttft_p50 is not None and direct.ttft_p50 is not None:
            delta = api.ttft_p50 - direct.ttft_p50
            lines.append(("TTFT p50 API - direct at 1 stream",
                          f"{delta:+.1f} ms (API {api.ttft_p50:.1f} ms, direct {direct.ttft_p50:.1f} ms;"
                          f" <= +{TARGET_TTFT_MS:.0f} ms)",
                          verdict(delta <= TARGET_TTFT_MS)))
    if "peer" in modes:
        for c in concurrency:
            ratio, rounds = ratio_of_rounds(summaries[("API", c)], summaries[("peer", c)])
            goal = TARGET_PEER.get(c)
            lines.append((f"InferQL/peer tok/s at {plural(c)}",
                          f"{ratio:.2f}x {f'(>= {goal}x)' if goal else '(no target)'} {per_round(rounds)}",
                          verdict(ratio >= goal if goal else None)))
        if 16 in concurrency:
            api, peer = summaries[("API", 16)], summaries[("peer", 16)]
            if api.ttft_p50 and peer.ttft_p50:
                r = api.ttft_p50 / peer.ttft_p50
                lines.append(("TTFT p50 InferQL/peer at 16 streams",
                              f"{r:.2f}x (InferQL {api.ttft_p50:.0f} ms, peer {peer.ttft_p50:.0f} ms;"
                              f" <= {TARGET_PEER_TTFT}x)", verdict(r <= TARGET_PEER_TTFT)))
    top = max(concurrency)
    if top >= 64:
        got = summaries[("API", top)]
        lines.append((f"{plural(top)} served through the API",
                      f"every stream completed; up to {got.max_batch} decoded together",
                      verdict(got.max_batch >= 64)))
    if machine and engine_facts:
        bw = machine["bandwidth_gbs"]
        if 1 in concurrency:
            rate = summaries[("direct", 1)].tok_s * engine_facts["weight_bytes"] / 1e9
            lines.append(("weights read at 1 stream / read bandwidth",
                          f"{rate / bw:.0%} ({engine_facts['weight_bytes'] / 1e6:.0f} MB per token x"
                          f" {summaries[('direct', 1)].tok_s:.1f} tok/s = {rate:.1f} GB/s of {bw:.1f};"
                          f" >= {TARGET_BANDWIDTH:.0%})", verdict(rate / bw >= TARGET_BANDWIDTH)))
        at = 16 if 16 in concurrency else top
        gemm = machine[f"gemm_{engine_facts['dtype']}_gflops"]
        flops = summaries[("direct", at)].tok_s * 2 * engine_facts["macs"] / 1e9
        lines.append((f"achieved FLOP/s at {plural(at)} / GEMM rate",
                      f"{flops / gemm:.0%} ({flops:.0f} of {gemm:.0f} GFLOP/s {engine_facts['dtype']}; no target)",
                      "n/a"))
    if fidelity is not None:
        lines.append(("fidelity: greedy agreement with float32 eager",
                      f"{fidelity.agreement:.1%} over {fidelity.positions} positions (>= {TARGET_AGREEMENT:.0%})",
                      verdict(fidelity.agreement >= TARGET_AGREEMENT)))
        lines.append(("fidelity: mean |d logprob| vs float32 eager",
                      f"{fidelity.mean_abs_dlogprob:.4f} (max {fidelity.max_abs_dlogprob:.3f}; <= {TARGET_DLOGPROB})",
                      verdict(fidelity.mean_abs_dlogprob <= TARGET_DLOGPROB)))
    width = max(len(name) for name, _, _ in lines)
    for name, value, status in lines:
        print(f"  {status:<5} {name:<{width}}  {value}")
    print("(targets are reported, never enforced: the exit status does not depend on them)")


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start one on a free port)")
    ap.add_argument("--api-key", default=os.environ.get("INFERQL_API_KEY"),
                    help="API key for --url (default: $INFERQL_API_KEY; the server started here makes its own)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts (default 1,4,16,64)")
    ap.add_argument("--max-tokens", type=int, default=128, help="maxTokens per generation (default 128)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of API+direct(+peer) phases (default 2)")
    ap.add_argument("--requests", type=int, default=4,
                    help="generations per phase, at least the concurrency (default 4)")
    ap.add_argument("--max-batch", type=int, default=64,
                    help="INFERQL_MAX_BATCH_SIZE of the server started here and of the direct engine (default 64)")
    ap.add_argument("--peer", action="store_true",
                    help="also run `transformers serve MODEL --continuous-batching` (pip install -e '.[bench]')")
    ap.add_argument("--peer-dtype", default="default",
                    help="the peer's --dtype (default: its own default, i.e. the weights' dtype)")
    ap.add_argument("--fidelity-tokens", type=int, default=16,
                    help="greedy tokens per prompt for the fidelity check over 20 prompts (0 = skip)")
    ap.add_argument("--model-path", type=Path, help="model folder for the server and the direct engine"
                    " (default: the default model)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the direct engine and the server it starts (INFERQL_TORCH_THREADS);"
                    "\n0 = torch's default, as the server runs by default (the default, except --smoke: 1,"
                    "\nsince 2+ threads on a busy small machine can stall for seconds in OpenMP barriers)")
    ap.add_argument("--no-jobs", action="store_true",
                    help="skip the job section (submission/poll latency, auth overhead)")
    ap.add_argument("--jobs-only", action="store_true",
                    help="only the job section (no streaming phases, no direct engine): about a minute")
    ap.add_argument("--jobs-client", choices=("lean", "httpx"), default="lean",
                    help="the job section's load generator: a lean keep-alive HTTP/1.1 client (default), or the"
                    "\nbundled httpx client, whose own CPU per request competes with the server on a small machine")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds: 1 round, concurrency 1,2, max-tokens 8, 4 generations per phase,"
                    " 1 torch thread")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.concurrency, args.max_tokens, args.requests = 1, "1,2", 8, 4
        args.fidelity_tokens = min(args.fidelity_tokens, 4)
        if args.threads is None:
            args.threads = 1
    if args.threads is None:
        args.threads = 0
    args.concurrency = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    if not args.concurrency or min(args.concurrency) < 1 or args.rounds < 1 or args.max_tokens < 1:
        ap.error("--concurrency, --rounds and --max-tokens must be positive")
    if args.threads < 0:
        ap.error("--threads must be 0 (torch's default) or more")
    return args


async def bench(args: argparse.Namespace) -> int:
    import torch

    from app.client import InferQLClient
    from app.settings import Settings

    settings = Settings()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.url is None:
        server_threads = args.threads or settings.torch_threads
        server_note = f"the server started here: {server_threads or torch.get_num_threads()}"
    else:
        server_note = "the server at --url: its own INFERQL_TORCH_THREADS"
    print(f"CPU cores: {os.cpu_count()}   torch threads: {torch.get_num_threads()} in this process;"
          f" {server_note}")
    load1, load5, _ = os.getloadavg()
    print(f"load average before the run: {load1:.2f} (1 min), {load5:.2f} (5 min) on {os.cpu_count()} cores"
          + ("  -- the machine is busy: absolute figures will be low and noisy" if load1 > 0.5 * (os.cpu_count() or 1)
             else ""))
    print(f"rounds {args.rounds}, concurrency {','.join(map(str, args.concurrency))}, maxTokens {args.max_tokens},"
          f" temperature 0, generations per phase max(c, {args.requests})", flush=True)

    machine = None
    if not args.jobs_only:
        from app.inference.model import EngineOptions, pick_device, pick_dtype

        dtype = pick_dtype(EngineOptions.from_settings(settings).dtype, pick_device(settings.device))
        machine = machine_limits(dtype, quick=args.smoke)  # before anything else computes
        from app.inference.model import cpu_has_native_bf16

        print(f"CPU native bf16 (AVX512-BF16/AMX): {'yes' if cpu_has_native_bf16() else 'no'};"
              f" the engine's default dtype here: {str(dtype).removeprefix('torch.')}")
        print("machine: read bandwidth {:.1f} GB/s; GEMM {}".format(machine["bandwidth_gbs"], ", ".join(
            f"{k.removeprefix('gemm_').removesuffix('_gflops')} {v:.0f} GFLOP/s"
            for k, v in machine.items() if k.startswith("gemm_"))), flush=True)

    install_client_timing()
    model_path = args.model_path
    server = peer = None
    tmp = tempfile.TemporaryDirectory(prefix="inferql-bench-")
    try:
        if args.url is None:
            if model_path is None:  # resolve once here so the server does not fetch it a second time
                from app.inference.weights import pull_default_model

                model_path = pull_default_model(Path(settings.cache_dir))
            server = Server(Path(tmp.name), model_path, args.threads, INFERQL_MAX_BATCH_SIZE=str(args.max_batch))
            server.start()
            base_url = server.url
        else:
            base_url = args.url.rstrip("/")
        api_key = args.api_key

        lm = None
        if not args.jobs_only:
            # Load the direct model while the server loads its own (load time is not measured).
            from transformers.utils import logging as hf_logging

            from app.inference.model import load_model

            hf_logging.disable_progress_bar()
            if model_path is None:
                from app.inference.weights import pull_default_model

                model_path = pull_default_model(Path(settings.cache_dir))
            t0 = time.perf_counter()
            lm = await asyncio.to_thread(load_model, model_path, settings.device, args.threads)
            print(f"direct: loaded {lm.info.id} ({lm.info.version}, {lm.info.dtype}, {lm.info.device},"
                  f" {'fast path' if lm.fast_weights() is not None else 'HF forward'})"
                  f" in {time.perf_counter() - t0:.1f}s", flush=True)
        if server is not None:
            t0 = time.perf_counter()
            await server.wait_ready()
            print(f"server: ready at {base_url} after {time.perf_counter() - t0:.1f}s more"
                  f" ({'with its bootstrap API key' if server.key else 'no API key printed: auth off?'})", flush=True)
            api_key = server.key
        if not args.jobs_only and args.peer:
            peer = Peer(Path(tmp.name), model_path, args.threads, args.peer_dtype)
            peer.start()
            t0 = time.perf_counter()
            await peer.wait_ready()
            print(f"peer: transformers serve --continuous-batching (dtype {args.peer_dtype}) ready at {peer.url}"
                  f" after {time.perf_counter() - t0:.1f}s", flush=True)
        if not args.jobs_only:
            direct = Direct(lm, args.max_batch)
            modes = ["API", "direct"] + (["peer"] if peer else [])

            async with InferQLClient(base_url, api_key=api_key) as client, \
                    httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as http:
                models = (await client.execute("{ models { id version dtype } }"))["models"]
                if not any(m["version"] == lm.info.version for m in models):
                    print(f"warning: the server serves {models}, the direct engine {lm.info.id} {lm.info.version}")
                print(f"server: {', '.join(m['id'] + ' ' + m['dtype'] for m in models)}; max batch {args.max_batch}",
                      flush=True)

                async def run_mode(mode: str, c: int, prompts: list[str], max_tokens: int) -> Phase:
                    if mode == "API":
                        return await api_phase(client, http, base_url, c, prompts, max_tokens)
                    if mode == "peer":
                        return await peer.phase(http, c, prompts, max_tokens)
                    await direct.start()
                    try:
                        return await direct.phase(c, prompts, max_tokens)
                    finally:
                        await direct.stop()

                # Warm-up: one short phase per mode at the highest concurrency (first forward passes,
                # batched kernels, the server's DB and sockets), not measured.
                top = max(args.concurrency)
                warm = phase_prompts(top, top)
                for mode in modes:
                    await run_mode(mode, top, warm, min(4, args.max_tokens))

                phases: dict[tuple[str, int], list[Phase]] = {}
                connect_ms: list[float] = []
                step = 0
                for r in range(args.rounds):
                    for c in args.concurrency:
                        # The modes of one concurrency run back to back, in an order that rotates,
                        # so that their ratios see the same machine load.
                        order = modes[step % len(modes):] + modes[:step % len(modes)]
                        step += 1
                        prompts = phase_prompts(c, args.requests)
                        for mode in order:
                            phase = await run_mode(mode, c, prompts, args.max_tokens)
                            if mode == "API":
                                connect_ms += [(s.t_submit - s.t_call) * 1000 for s in phase.streams if s.t_call]
                            phases.setdefault((mode, c), []).append(phase)
                            print(f"round {r + 1} {mode:<6} {c:>2} streams: {phase.tokens:>5} tokens"
                                  f" in {phase.wall_s:6.2f}s = {phase.tok_s:7.1f} tok/s, max batch {phase.max_batch}",
                                  flush=True)
            if peer is not None:
                peer.stop()
                peer = None

            fidelity = None
            if args.fidelity_tokens > 0 and lm.fast_weights() is not None:
                from app.inference.fidelity import measure

                n = 2 if args.smoke else len(FIDELITY_PROMPTS)
                prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in FIDELITY_PROMPTS[:n]]
                t0 = time.perf_counter()
                fidelity = await asyncio.to_thread(measure, lm, prompts, args.fidelity_tokens)
                print(f"fidelity: {n} prompts x {args.fidelity_tokens} tokens against float32 eager"
                      f" in {time.perf_counter() - t0:.1f}s", flush=True)
            weight_bytes, macs = weight_bytes_per_token(lm)
            facts = {"weight_bytes": weight_bytes, "macs": macs, "dtype": lm.info.dtype}
            summaries = {key: summarize(ps) for key, ps in phases.items()}
            report(summaries, args.concurrency, connect_ms, modes, machine, facts, fidelity)
        if not args.no_jobs:
            scale = 4 if args.smoke else 1
            await jobs_section(base_url, api_key, client_kind=args.jobs_client, saturate=16 // scale,
                               submitters=10 // (scale // 2 or 1), per_submitter=50 // scale, polls=200 // scale)
            if server is not None:
                server.stop()
                server = None
                await auth_overhead(Path(tmp.name), model_path, args.threads, polls=100 // scale,
                                    rounds=3 if not args.smoke else 1)
        return 0
    finally:
        if server is not None:
            server.stop()
        if peer is not None:
            peer.stop()
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
