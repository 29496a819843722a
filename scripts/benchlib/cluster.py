"""`scripts/bench.py --cluster`: the scaled-out topology against the embedded one, in one run.

Processes: an API-only replica and two workers on a fresh PostgreSQL database and Redis
(the cluster), one embedded `serve` (SQLite, everything in process), and the engine called
directly in this process (the baseline). Phases run one at a time, alternating, so every
figure is a ratio of two measured in the same minutes:

- streaming: `generate` tokens/s through the cluster (API replica -> worker -> Redis
  stream -> API replica) and through the embedded server, each over the direct engine, at
  1 and 8 streams (the second worker is paused: one engine each);
- submission latency: submitGeneration p50/p99 while 8 streams keep the engine busy, on the
  API-only replica (the engine in another process) and on the embedded server;
- aggregate tokens/s of 16 jobs with one worker (the second paused with SIGSTOP) and with two.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

from tests.databases import REDIS, fresh_postgres
from tests.harness import ApiReplica, ServerProcess, WorkerProcess

from .report import percentile
from .server import BENCH_ENV
from .streams import Direct, api_stream, phase_prompts, run_phase

SUBMIT = "mutation($input: GenerationInput!) { submitGeneration(input: $input) { id } }"
JOB = "query($id: ID!) { job(id: $id) { status finishedAt result { usage { completionTokens } } } }"


async def stream_tok_s(client, concurrency: int, max_tokens: int) -> float:
    prompts = phase_prompts(concurrency, concurrency)
    streams = await run_phase(concurrency, prompts, lambda p: api_stream(client, p, max_tokens))
    wall = max(s.t_done for s in streams) - min(s.t_submit for s in streams)
    return sum(s.tokens for s in streams) / wall


async def direct_tok_s(direct: Direct, concurrency: int, max_tokens: int) -> float:
    phase = await direct.phase(concurrency, phase_prompts(concurrency, concurrency), max_tokens)
    return phase.tok_s


async def submit_latency(client, n: int, max_tokens: int) -> list[float]:
    """n sequential submits (1 token each) while 8 long streams keep the engine busy; ms."""
    load = asyncio.gather(*(api_stream(client, p, max_tokens) for p in phase_prompts(8, 8)))
    await asyncio.sleep(1.0)  # the streams are decoding
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.execute(SUBMIT, {"input": {"prompt": f"Hi {i}", "maxTokens": 1}})
        times.append((time.perf_counter() - t0) * 1000)
    await load
    return times


async def jobs_tok_s(client, jobs: int, max_tokens: int) -> float:
    t0 = time.perf_counter()
    ids = [(await client.execute(SUBMIT, {"input": {"prompt": p, "maxTokens": max_tokens}}))["submitGeneration"]["id"]
           for p in phase_prompts(jobs, jobs)]
    tokens = 0
    for job_id in ids:
        while True:
            job = (await client.execute(JOB, {"id": job_id}))["job"]
            if job["status"] not in ("QUEUED", "RUNNING"):
                tokens += job["result"]["usage"]["completionTokens"] if job["result"] else 0
                break
            await asyncio.sleep(0.05)
    return tokens / (time.perf_counter() - t0)


async def cluster_section(workdir: Path, model_path: Path, lm, threads: int, *, rounds: int, max_tokens: int,
                          smoke: bool) -> None:
    async with fresh_postgres("inferql_bench") as url:
        await _cluster_section(url, workdir, model_path, lm, threads, rounds=rounds, max_tokens=max_tokens, smoke=smoke)


async def _cluster_section(url: str, workdir: Path, model_path: Path, lm, threads: int, *, rounds: int,
                           max_tokens: int, smoke: bool) -> None:
    env = {**BENCH_ENV, "INFERQL_DATABASE_URL": url, "INFERQL_REDIS_URL": REDIS,
           "INFERQL_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:", "INFERQL_DATA_DIR": str(workdir / "cluster")}
    api = ApiReplica(workdir, env, model_path=model_path, threads=threads, stop_grace=30)
    workers = [WorkerProcess(workdir, {**env, "INFERQL_WORKER_ID": f"bench-w{i}"}, model_path=model_path,
                             threads=threads, stop_grace=30) for i in range(2)]
    embedded = ServerProcess(workdir, BENCH_ENV, model_path=model_path, threads=threads, stop_grace=30)
    direct = Direct(lm, max_batch_size=16)
    procs = [api, *workers, embedded]
    try:
        api.spawn()
        await api.wait_ready()  # it migrates the fresh database
        for p in [*workers, embedded]:
            p.spawn()
        for p in [*workers, embedded]:
            await p.wait_ready()
        print(f"\ncluster: API-only replica {api.url}, workers {workers[0].url} {workers[1].url} on PostgreSQL + "
              f"Redis; embedded server {embedded.url} on SQLite", flush=True)
        streams = [1, 2] if smoke else [1, 8]
        n_submit, n_jobs = (5, 4) if smoke else (40, 16)
        rows: dict[str, list[float]] = {}

        def add(name: str, value: float) -> None:
            rows.setdefault(name, []).append(value)

        async with api.client() as ca, embedded.client() as ce:
            for c in (1,):  # warm-up: both paths once
                await stream_tok_s(ca, c, 4)
                await stream_tok_s(ce, c, 4)
            for _ in range(rounds):
                workers[1].proc.send_signal(signal.SIGSTOP)  # one engine on each side: the second paused
                for c in streams:
                    await direct.start()
                    d = await direct_tok_s(direct, c, max_tokens)
                    await direct.stop()
                    add(f"direct tok/s, {c} streams", d)
                    add(f"cluster API/direct, {c} streams", await stream_tok_s(ca, c, max_tokens) / d)
                    add(f"embedded API/direct, {c} streams", await stream_tok_s(ce, c, max_tokens) / d)
                cl = await submit_latency(ca, n_submit, max_tokens)
                em = await submit_latency(ce, n_submit, max_tokens)
                add("submit p50 ms, API-only replica (engine elsewhere)", percentile(cl, 0.5))
                add("submit p50 ms, embedded (engine in process)", percentile(em, 0.5))
                add("submit p99 ms, API-only replica (engine elsewhere)", percentile(cl, 0.99))
                add("submit p99 ms, embedded (engine in process)", percentile(em, 0.99))
                one = await jobs_tok_s(ca, n_jobs, max_tokens)
                workers[1].proc.send_signal(signal.SIGCONT)
                two = await jobs_tok_s(ca, n_jobs, max_tokens)
                add(f"{n_jobs} jobs tok/s, 1 worker", one)
                add(f"{n_jobs} jobs tok/s, 2 workers", two)
                add("2 workers / 1 worker", two / one)
        print(f"\n{'cluster figures (' + str(rounds) + ' rounds, maxTokens ' + str(max_tokens) + ')':60s} "
              f"{'median':>9s}   rounds")
        for name, values in rows.items():
            values_sorted = sorted(values)
            median = values_sorted[len(values_sorted) // 2]
            print(f"  {name:58s} {median:9.3f}   {' '.join(f'{v:.3f}' for v in values)}")
        ratio = [a / b for a, b in zip(rows["submit p99 ms, API-only replica (engine elsewhere)"],
                                        rows["submit p99 ms, embedded (engine in process)"])]
        print(f"  {'submit p99, engine elsewhere / in process':58s} {sorted(ratio)[len(ratio) // 2]:9.3f}")
    finally:
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
        for p in procs:
            p.stop()
