"""The job section: `submitGeneration` latency while the engine is saturated (one client alone,
then concurrent submitters), jobs accepted per second, `job(id)` poll latency, and what auth +
rate limiting add (two idle servers, with and without)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from pathlib import Path

from .report import percentile, verdict
from .server import bench_server

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

    on = bench_server(workdir, model_path, threads)
    off = bench_server(workdir, model_path, threads, INFERQL_AUTH="off")
    try:
        on.spawn()
        off.spawn()
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
