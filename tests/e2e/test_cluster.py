"""The scaled-out topology with the real model: 2 API replicas (`serve --api-only`) and
2 workers (`inferql worker`) on a fresh PostgreSQL database and Redis, as separate
processes. Every test talks to the replicas over HTTP/websockets, as a client would.

The module's tests share one cluster and run in file order; the SIGKILL test is last.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from app.client import GraphQLErrors
from tests.harness import ApiReplica, WorkerProcess, stop_process, wait_until
from tests.jobs.test_webhooks import Receiver, wait_hits
from tests.databases import REDIS as REDIS_URL, fresh_postgres


SUBMIT = """mutation($input: GenerationInput!) { submitGeneration(input: $input) { id status queuePosition } }"""
JOB = """query($id: ID!) { job(id: $id) { id status attempts queuePosition
  result { text usage { completionTokens } tokens { seq text } } error { code } } }"""
EVENTS = """subscription($id: ID!, $after: Int!) { jobEvents(id: $id, after: $after) {
  __typename ... on JobEvent { seq } ... on TokenGenerated { index text logprob } } }"""
GENERATE = """subscription($input: GenerationInput!) { generate(input: $input) {
  __typename ... on JobEvent { jobId seq } ... on TokenGenerated { text }
  ... on GenerationCompleted { result { text } } } }"""
CANCEL = """mutation($id: ID!) { cancelJob(id: $id) { status result { usage { completionTokens } } } }"""


class Cluster:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.apis: list[ApiReplica] = []
        self.workers: list[WorkerProcess] = []

    def add_api(self) -> ApiReplica:
        key = self.apis[0].key if self.apis else None
        replica = ApiReplica(self.tmp, self.env, key=key)
        self.apis.append(replica)
        return replica

    def add_worker(self, **env: str) -> WorkerProcess:
        worker = WorkerProcess(self.tmp, {**self.env, "INFERQL_WORKER_ID": f"w{len(self.workers)}", **env})
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for proc in [*self.apis, *self.workers]:
            proc.stop()


@pytest.fixture(scope="module")
async def pg_url():
    async with fresh_postgres("inferql_cluster") as url:
        yield url


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory, real_model_dir, pg_url):
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    tmp = tmp_path_factory.mktemp("cluster")
    env = {
        "INFERQL_DATABASE_URL": pg_url,
        "INFERQL_REDIS_URL": REDIS_URL,
        "INFERQL_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}:",
        "INFERQL_DATA_DIR": str(tmp / "data"),   # one first-key file for the deployment
        "INFERQL_MODEL_PATH": str(real_model_dir),
        "INFERQL_LEASE_SECONDS": "8",            # short, so the SIGKILL test is quick; long enough for a loaded CI
        "INFERQL_MAX_BATCH_SIZE": "2",            # two slots per worker: 8 jobs need both
        "INFERQL_TORCH_THREADS": "1",
        "INFERQL_WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "INFERQL_WEBHOOK_ALLOW_PRIVATE": "true",  # the test's receiver is on loopback
    }
    c = Cluster(tmp, env)
    try:
        c.add_api().spawn()  # migrates the fresh database while the others start
        for _ in range(2):
            c.add_worker().spawn()
        c.add_api().spawn()
        # Either API replica may make the first admin key (both find the fresh database empty;
        # the other starts without making one) and writes it to the shared data folder: each
        # reads it once ready, the first replica last.
        for proc in [*c.workers, *c.apis[1:], c.apis[0]]:
            await proc.wait_ready()
        c.apis[1].key = c.apis[0].key
        yield c
    finally:
        c.stop()


async def submit(client, prompt: str, max_tokens: int) -> str:
    data = await client.execute(SUBMIT, {"input": {"prompt": prompt, "maxTokens": max_tokens}})
    return data["submitGeneration"]["id"]


async def job(client, job_id: str) -> dict:
    return (await client.execute(JOB, {"id": job_id}))["job"]


async def until_status(client, job_id: str, *statuses: str, timeout: float = 120) -> dict:
    async def check():
        j = await job(client, job_id)
        return j if j["status"] in statuses else None

    return await wait_until(check, f"job {job_id} to be {'/'.join(statuses)}", timeout=timeout)


async def events(client, job_id: str, after: int = 0) -> list[dict]:
    return [d["jobEvents"] async for d in client.subscribe(EVENTS, {"id": job_id, "after": after})]


async def test_jobs_submitted_to_one_replica_run_on_both_workers_once_each(cluster):
    a, b = cluster.apis[:2]
    before = [w.jobs_started() for w in cluster.workers]
    async with a.client() as ca, b.client() as cb:
        ids = [await submit(ca, f"Name a colour, then count to {n}.", 12) for n in range(8)]
        jobs = [await until_status(cb, i, "SUCCEEDED") for i in ids]
        ran = [w.jobs_started() - n for w, n in zip(cluster.workers, before)]
        assert sum(ran) == 8 and all(n > 0 for n in ran), ran
        assert [j["attempts"] for j in jobs] == [1] * 8
        for i, j in zip(ids, jobs):
            log = await events(cb, i)  # the replay, from the job's Redis stream
            kinds = [e["__typename"] for e in log]
            assert kinds.count("GenerationStarted") == 1 and kinds[-1] == "GenerationCompleted"
            assert "".join(e["text"] for e in log if e["__typename"] == "TokenGenerated") == j["result"]["text"]


async def test_job_events_on_another_replica_stream_live_and_match(cluster):
    a, b = cluster.apis[:2]
    async with a.client() as ca, b.client() as cb:
        job_id = await submit(ca, "Describe a lighthouse at night.", 40)
        seen_running: list[str] = []

        async def follow(client, check_live: bool) -> list[dict]:
            out = []
            async for data in client.subscribe(EVENTS, {"id": job_id, "after": 0}):
                event = data["jobEvents"]
                out.append(event)
                if check_live and event["__typename"] == "TokenGenerated" and not seen_running:
                    seen_running.append((await job(cb, job_id))["status"])
            return out

        on_a, on_b = await asyncio.gather(follow(ca, False), follow(cb, True))
        assert on_a == on_b
        assert seen_running == ["RUNNING"]  # B had the first token while the worker was still generating
        tokens = [e for e in on_b if e["__typename"] == "TokenGenerated"]
        assert [e["seq"] for e in on_b] == list(range(1, len(on_b) + 1))
        assert len(tokens) == (await job(ca, job_id))["result"]["usage"]["completionTokens"]

        # A generate subscription on B runs end to end on a worker.
        stream = [d["generate"] async for d in cb.subscribe(GENERATE, {"input": {"prompt": "Say hi.", "maxTokens": 8}})]
        assert stream[-1]["__typename"] == "GenerationCompleted"
        text = "".join(e["text"] for e in stream if e["__typename"] == "TokenGenerated")
        assert stream[-1]["result"]["text"] == text
        assert (await job(ca, stream[0]["jobId"]))["result"]["text"] == text


async def test_classify_on_an_api_only_replica_runs_on_a_worker(cluster):
    async with cluster.apis[1].client() as cb:
        data = await cb.execute(
            """mutation($input: ClassificationInput!) { classify(input: $input) {
                 label scores { label probability } model { version device } usage { promptTokens } } }""",
            {"input": {"text": "I love this phone, it is wonderful!", "labels": ["positive", "negative"]}})
    result = data["classify"]
    assert result["label"] in ("positive", "negative")
    assert abs(sum(s["probability"] for s in result["scores"]) - 1) < 1e-4
    assert result["model"]["device"] == "cpu"  # the worker's model answered, not the replica's description
    assert result["usage"]["promptTokens"] > 0


async def test_cancel_on_another_replica(cluster):
    a, b = cluster.apis[:2]
    async with a.client() as ca, b.client() as cb:
        # Four long jobs fill both workers' two slots; a fifth waits.
        running = [await submit(ca, f"Write a long story about the number {n}.", 400) for n in range(4)]
        for job_id in running:
            await until_status(ca, job_id, "RUNNING")
        queued = await submit(ca, "This one never starts.", 8)
        on_a, on_b = await job(ca, queued), await job(cb, queued)
        assert on_a["status"] == on_b["status"] == "QUEUED"
        assert on_a["queuePosition"] == on_b["queuePosition"] == 0  # a database fact, the same everywhere

        cancelled = (await cb.execute(CANCEL, {"id": queued}))["cancelJob"]
        assert cancelled["status"] == "CANCELLED" and cancelled["result"]["usage"]["completionTokens"] == 0
        assert "GenerationStarted" not in [e["__typename"] for e in await events(ca, queued)]

        t0 = time.monotonic()
        stopped = (await cb.execute(CANCEL, {"id": running[0]}))["cancelJob"]
        elapsed = time.monotonic() - t0
        print(f"cancel of a running job through another replica: {elapsed * 1000:.0f} ms")
        assert stopped["status"] == "CANCELLED"
        assert elapsed < 1.0
        assert stopped["result"]["usage"]["completionTokens"] < 400
        for job_id in running[1:]:
            await cb.execute(CANCEL, {"id": job_id})
        await asyncio.sleep(0.5)
        assert (await job(ca, queued))["status"] == "CANCELLED"  # and it stayed so

        # A client that drops a `generate` on B cancels its job on the worker the same way.
        seen = []
        async for data in cb.subscribe(GENERATE, {"input": {"prompt": "Tell a very long story.", "maxTokens": 300}}):
            seen.append(data["generate"])
            if sum(e["__typename"] == "TokenGenerated" for e in seen) >= 3:
                break
        dropped = await until_status(ca, seen[0]["jobId"], "CANCELLED", "SUCCEEDED", timeout=30)
        assert dropped["status"] == "CANCELLED" and dropped["result"]["usage"]["completionTokens"] < 300


async def test_webhook_of_a_job_a_worker_ran_is_sent_at_once(cluster):
    """The worker stores the end with its webhook message; an API replica delivers it, woken
    through Redis (its fallback is a pass a minute)."""
    receiver = Receiver().start()
    try:
        url = receiver.route("done", [200])
        async with cluster.apis[1].client() as cb:
            data = await cb.execute(
                """mutation($input: GenerationInput!, $options: JobOptions) {
                     submitGeneration(input: $input, options: $options) { id } }""",
                {"input": {"prompt": "Say yes.", "maxTokens": 4}, "options": {"webhookUrl": url}})
            job_id = data["submitGeneration"]["id"]
            await until_status(cb, job_id, "SUCCEEDED")
            ended = time.monotonic()
            hits = await wait_hits(receiver, url, 1, timeout=30)
            print(f"webhook sent {time.monotonic() - ended:.2f} s after the job's end was seen")
            assert time.monotonic() - ended < 20
            assert job_id.encode() in hits[0].body and b"SUCCEEDED" in hits[0].body
    finally:
        receiver.stop()


async def test_rpm_is_one_window_across_replicas(cluster):
    a, b = cluster.apis[:2]
    key = a.create_key("five-a-minute", "--rpm", "5")
    accepted, refused = 0, []
    async with a.client(key) as ca, b.client(key) as cb:
        for n in range(8):
            client = (ca, cb)[n % 2]
            try:
                await submit(client, "Hi.", 1)
                accepted += 1
            except GraphQLErrors as exc:
                refused += exc.codes
    assert accepted == 5
    assert refused == ["RATE_LIMITED"] * 3


async def test_a_replica_started_while_others_are_busy_takes_no_live_job(cluster):
    a = cluster.apis[0]
    async with a.client() as ca:
        # long enough to be seen RUNNING: the native decode step writes a short list in ~0.2 s
        busy = [await submit(ca, f"Write a long story about the number {n}.", 400) for n in (3, 4)]
        for job_id in busy:
            await until_status(ca, job_id, "RUNNING")
        late = cluster.add_api()
        await late.spawn().wait_ready()  # its start reaps: nothing with a live lease may move
        late_worker = cluster.add_worker()
        await late_worker.spawn().wait_ready()
        for job_id in busy:
            done = await until_status(ca, job_id, "SUCCEEDED")
            assert done["attempts"] == 1
            kinds = [e["__typename"] for e in await events(ca, job_id)]
            assert kinds.count("GenerationStarted") == 1 and kinds.count("JobQueued") == 1
        late_worker.stop()
        cluster.workers.remove(late_worker)


async def test_sigkill_of_a_worker_mid_job(cluster):
    a, b = cluster.apis[:2]
    async with a.client() as ca, b.client() as cb:
        before = [w.jobs_started() for w in cluster.workers]
        job_id = await submit(ca, "Explain how tides work, step by step.", 400)  # still running when killed
        await until_status(ca, job_id, "RUNNING")
        runner = next(w for w, n in zip(cluster.workers, before) if w.jobs_started() > n)
        runner.proc.send_signal(signal.SIGKILL)
        runner.proc.wait()
        done = await until_status(cb, job_id, "SUCCEEDED", "FAILED", timeout=120)
        assert done["status"] == "SUCCEEDED"
        assert done["attempts"] == 2
        kinds = [e["__typename"] for e in await events(cb, job_id)]
        # Queued, started and cut off on the killed worker; queued again by a reaper once the
        # lease lapsed; started and finished on the other worker. One result, stored once.
        assert kinds.count("GenerationStarted") == 2 and kinds.count("JobQueued") == 2
        assert kinds[-1] == "GenerationCompleted" and kinds.count("GenerationCompleted") == 1
        conn = await asyncpg.connect(cluster.env["INFERQL_DATABASE_URL"])
        try:
            row = await conn.fetchrow("SELECT status, attempts, result_json IS NOT NULL AS has_result, queue_held "
                                      "FROM jobs WHERE id = $1", job_id)
        finally:
            await conn.close()
        assert dict(row) == {"status": "SUCCEEDED", "attempts": 2, "has_result": True, "queue_held": False}
        stop_process(runner.proc)
