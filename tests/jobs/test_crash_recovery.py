"""A server killed with SIGKILL mid-generation loses no job: the next process on the same
database runs every unfinished job again, exactly once (tiny random model, real servers)."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

import pytest

from app.client import InferQLClient
from tests.conftest import ServerProcess, wait_until

pytestmark = pytest.mark.e2e

SUBMIT = """
mutation Submit($input: GenerationInput!, $options: JobOptions) {
  submitGeneration(input: $input, options: $options) { id status }
}
"""

JOB = """
query Job($id: ID!) {
  job(id: $id) {
    id status attempts error { code message }
    result { text finishReason usage { promptTokens completionTokens totalTokens } }
  }
}
"""

JOBS = """
query Jobs($status: JobStatus, $first: Int!, $after: String) {
  jobs(status: $status, first: $first, after: $after) {
    nodes { id status attempts }
    pageInfo { hasNextPage endCursor }
  }
}
"""

LONG_TOKENS = 450  # ~0.7-1 s on the tiny model: long enough to be mid-run when killed (context 512)


def tiny_env(tiny_model_dir, **extra: str) -> dict[str, str]:
    return {"INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_TORCH_THREADS": "1",
            "INFERQL_AUTH": "off",  # trusted local tests: no API keys, no per-key quotas
            "INFERQL_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", **extra}


def stop(server: ServerProcess | None) -> None:
    if server is not None and getattr(server, "_log", None) is not None:
        server.stop()


def kill(server: ServerProcess) -> None:
    """SIGKILL: no shutdown handler runs, exactly like a crashed worker."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)


def restarted(tmp_path, old: ServerProcess) -> ServerProcess:
    """A new process (new port) on the old one's database file and settings."""
    return ServerProcess(tmp_path, {k: v for k, v in old.env.items() if k.startswith("INFERQL_") and k != "INFERQL_PORT"})


def rows(server: ServerProcess, query: str, *args) -> list[tuple]:
    return server.sql(query, *args)




async def submit(client: InferQLClient, input: dict) -> str:
    return (await client.execute(SUBMIT, {"input": input}))["submitGeneration"]["id"]


async def wait_running(client: InferQLClient, job_ids: list[str]) -> None:
    async def any_running():
        for job_id in job_ids:
            if (await client.execute(JOB, {"id": job_id}))["job"]["status"] == "RUNNING":
                return True
        return False
    await wait_until(any_running, "a job to be RUNNING", timeout=60, interval=0.02)


async def wait_all_terminal(client: InferQLClient, job_ids: list[str], timeout: float = 120) -> dict[str, dict]:
    jobs: dict[str, dict] = {}

    async def done():
        for job_id in job_ids:
            if job_id not in jobs:
                job = (await client.execute(JOB, {"id": job_id}))["job"]
                if job["status"] in ("QUEUED", "RUNNING"):
                    return False
                jobs[job_id] = job
        return True
    await wait_until(done, f"all {len(job_ids)} jobs to finish", timeout=timeout, interval=0.2)
    return jobs


async def test_sigkill_mid_generation_reruns_each_unfinished_job_once(tmp_path, tiny_model_dir):
    first = ServerProcess(tmp_path, tiny_env(tiny_model_dir, INFERQL_MAX_BATCH_SIZE="2"))
    second = None
    prompts = [{"prompt": f"Tell me a long story number {i}.", "maxTokens": LONG_TOKENS} for i in range(6)]
    try:
        first.start()
        async with InferQLClient(first.url) as c:
            job_ids = [await submit(c, p) for p in prompts]
            await wait_running(c, job_ids)
        kill(first)

        at_kill = dict(rows(first, "select id, status from jobs"))
        assert sorted(at_kill) == sorted(job_ids)
        running = {j for j, s in at_kill.items() if s == "RUNNING"}
        assert running, f"no job was RUNNING when the server was killed: {at_kill}"
        assert len(running) <= 2, f"more jobs RUNNING than the batch size allows: {at_kill}"
        assert set(at_kill.values()) <= {"QUEUED", "RUNNING", "SUCCEEDED"}, at_kill

        second = restarted(tmp_path, first).start()
        async with InferQLClient(second.url) as c:
            jobs = await wait_all_terminal(c, job_ids)

        stored = {j: (s, a) for j, s, a in rows(second, "select id, status, attempts from jobs")}
        for job_id, prompt in zip(job_ids, prompts):
            status, attempts = stored[job_id]
            expected = 2 if job_id in running else 1
            assert status == "SUCCEEDED", (job_id, at_kill[job_id], stored[job_id], jobs[job_id])
            assert attempts == expected, (
                f"job {job_id} was {at_kill[job_id]} at the kill: expected {expected} attempts, got {attempts}")
            job = jobs[job_id]
            assert job["status"] == "SUCCEEDED" and job["attempts"] == attempts and job["error"] is None
            result = job["result"]
            assert (result["usage"]["completionTokens"] == prompt["maxTokens"] and result["finishReason"] == "LENGTH") \
                or result["finishReason"] == "STOP", result["finishReason"]
        assert rows(second, "select count(*) from jobs")[0][0] == 6, "a job was duplicated"
    finally:
        stop(first)
        stop(second)


async def test_job_whose_worker_died_on_its_last_attempt_fails_worker_lost(tmp_path, tiny_model_dir):
    first = ServerProcess(tmp_path, tiny_env(tiny_model_dir, INFERQL_MAX_ATTEMPTS="1"))
    second = None
    try:
        first.start()
        async with InferQLClient(first.url) as c:
            job_id = await submit(c, {"prompt": "Tell me a long story.", "maxTokens": LONG_TOKENS})
            await wait_running(c, [job_id])
        kill(first)
        assert rows(first, "select status, attempts from jobs where id = ?", job_id) == [("RUNNING", 1)], \
            "the job finished before the kill: nothing to recover"

        second = restarted(tmp_path, first).start()
        async with InferQLClient(second.url) as c:
            job = (await wait_all_terminal(c, [job_id]))[job_id]
            assert job["status"] == "FAILED", job
            assert job["error"]["code"] == "WORKER_LOST" and job["error"]["message"], job
            assert job["attempts"] == 1 and job["result"] is None
            fresh = await submit(c, {"prompt": "Hello there", "maxTokens": 4})
            again = (await wait_all_terminal(c, [fresh]))[fresh]
            assert again["status"] == "SUCCEEDED" and again["attempts"] == 1, again
        assert rows(second, "select status, error_code from jobs where id = ?", job_id) == [("FAILED", "WORKER_LOST")]
    finally:
        stop(first)
        stop(second)


async def test_200_concurrent_submissions_all_run_exactly_once(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path, tiny_env(tiny_model_dir, INFERQL_MAX_QUEUED_JOBS="1000"))
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(n: int) -> list[str]:
        ids = []
        async with InferQLClient(server.url) as c:
            for i in range(20):
                t0 = time.perf_counter()
                body = await c.execute_raw(SUBMIT, {"input": {"prompt": f"client {n} job {i}", "maxTokens": 2}})
                latencies.append(time.perf_counter() - t0)
                if body.get("errors"):
                    errors.append(f"client {n} job {i}: {body['errors']}")
                else:
                    ids.append(body["data"]["submitGeneration"]["id"])
        return ids

    try:
        server.start()
        started = time.perf_counter()
        per_client = await asyncio.gather(*(worker(n) for n in range(10)))
        elapsed = time.perf_counter() - started
        ids = [j for chunk in per_client for j in chunk]
        assert not errors, errors[:5]
        assert len(ids) == 200 and len(set(ids)) == 200, f"{len(ids)} accepted, {len(set(ids))} distinct"

        def succeeded() -> int:
            return rows(server, "select count(*) from jobs where status = 'SUCCEEDED'")[0][0]
        await wait_until(lambda: succeeded() == 200, "all 200 jobs to succeed", timeout=120, interval=0.5)

        stored = dict(rows(server, "select id, status from jobs"))
        assert set(stored) == set(ids) and set(stored.values()) == {"SUCCEEDED"}
        assert {a for (a,) in rows(server, "select attempts from jobs")} == {1}

        seen: list[str] = []
        after = None
        async with InferQLClient(server.url) as c:
            for _ in range(10):
                page = (await c.execute(JOBS, {"status": "SUCCEEDED", "first": 100, "after": after}))["jobs"]
                seen += [n["id"] for n in page["nodes"]]
                if not page["pageInfo"]["hasNextPage"]:
                    break
                after = page["pageInfo"]["endCursor"]
        assert len(seen) == len(set(seen)) == 200, f"{len(seen)} listed, {len(set(seen))} distinct"
        assert set(seen) == set(ids)

        ms = sorted(x * 1000 for x in latencies)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(f"\n200 submissions from 10 clients in {elapsed:.2f}s; latency p50 {statistics.median(ms):.1f} ms, "
              f"p99 {p99:.1f} ms, max {ms[-1]:.1f} ms")
    finally:
        stop(server)
