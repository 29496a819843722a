"""Webhooks end to end: a real server (tiny random model) calls a real HTTP receiver run
by the test. Signatures are checked with the Standard Webhooks reference library, every
attempt is counted on the receiving side and compared with what the API records."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from app.client import InferQLClient
from tests.conftest import ServerProcess, wait_until, free_port

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
WAIT = 15.0  # seconds: bound of every wait for a delivery

DELIVERIES = "webhookDeliveries { attempt at outcome httpStatus error nextRetryAt }"

SUBMIT = """
mutation Submit($input: GenerationInput!, $options: JobOptions) {
  submitGeneration(input: $input, options: $options) { id status }
}
"""

JOB = f"""
query Job($id: ID!) {{
  job(id: $id) {{
    id status attempts error {{ code message }}
    result {{ finishReason confidence {{ score }} model {{ id version }}
              usage {{ promptTokens completionTokens totalTokens }} }}
    {DELIVERIES}
  }}
}}
"""

SUBMIT_BATCH = """
mutation SubmitBatch($inputs: [GenerationInput!]!, $options: JobOptions) {
  submitBatch(inputs: $inputs, options: $options) { id status size }
}
"""

BATCH = f"""
query Batch($id: ID!) {{
  batch(id: $id) {{
    id status size
    counts {{ queued running succeeded failed cancelled expired total }}
    usage {{ promptTokens completionTokens totalTokens }}
    {DELIVERIES}
    jobs(first: 100) {{ nodes {{ id status batchId result {{ usage {{ completionTokens }} }} {DELIVERIES} }} }}
  }}
}}
"""

SHORT = {"prompt": "Hello there", "maxTokens": 4}


# ---- the receiver ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    """A ThreadingHTTPServer on 127.0.0.1 that records every POST and answers each path
    with its scripted statuses in turn (the last one repeats); unknown paths get 404."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._scripts: dict[str, list[int]] = {}
        self._delays: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    script = receiver._scripts.get(self.path, [404])
                    n = sum(1 for h in receiver._hits if h.path == self.path)
                    status = script[min(n, len(script) - 1)]
                    delay = receiver._delays.get(self.path, 0.0)
                    receiver._hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()},
                                              body, status))
                if delay:
                    time.sleep(random.uniform(0, delay))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def route(self, name: str, statuses: list[int], max_delay: float = 0.0) -> str:
        """A fresh path answering `statuses` (each after a random pause up to max_delay s);
        returns the full URL."""
        path = f"/{name}-{uuid.uuid4().hex[:8]}"
        self.script(path, statuses)
        with self._lock:
            self._delays[path] = max_delay
        return self.url + path

    def script(self, path: str, statuses: list[int]) -> None:
        with self._lock:
            self._scripts[path] = list(statuses)

    def hits(self, url: str) -> list[Hit]:
        path = url.removeprefix(self.url)
        with self._lock:
            return [h for h in self._hits if h.path == path]


# ---- helpers --------------------------------------------------------------------------


def server_env(tiny_model_dir, data_dir, delays: str, **extra: str) -> dict[str, str]:
    return {
        "INFERQL_MODEL_PATH": str(tiny_model_dir),
        "INFERQL_WEBHOOK_SECRET": SECRET,
        "INFERQL_WEBHOOK_RETRY_DELAYS": delays,
        "INFERQL_WEBHOOK_TIMEOUT": "5",
        "INFERQL_DATA_DIR": str(data_dir),
        "INFERQL_TORCH_THREADS": "1",
        "INFERQL_AUTH": "off",  # trusted local tests: no API keys, no per-key quotas
        "INFERQL_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
        **extra,
    }


def stop(server: ServerProcess | None) -> None:
    if server is not None and getattr(server, "_log", None) is not None:
        server.stop()


def db_path(server: ServerProcess) -> str:
    return server.env["INFERQL_DATABASE_URL"].removeprefix("sqlite:///")


def sql(server: ServerProcess, query: str, *args) -> list[tuple]:
    return server.sql(query, *args)




async def wait_hits(receiver: Receiver, url: str, n: int, timeout: float = WAIT) -> list[Hit]:
    await wait_until(lambda: len(receiver.hits(url)) >= n, f"{n} POSTs to {url} "
                     f"(got {len(receiver.hits(url))})", timeout)
    return receiver.hits(url)


async def get_job(client: InferQLClient, job_id: str) -> dict:
    return (await client.execute(JOB, {"id": job_id}))["job"]


async def wait_deliveries(client: InferQLClient, job_id: str, n: int, timeout: float = WAIT) -> list[dict]:
    """The job's recorded deliveries once there are (at least) n of them."""
    async def check():
        deliveries = (await get_job(client, job_id))["webhookDeliveries"]
        return deliveries if len(deliveries) >= n else None
    return await wait_until(check, f"{n} recorded deliveries of job {job_id}", timeout)


def webhook_state(server: ServerProcess, subject_id: str) -> list[tuple]:
    return sql(server, "select state, attempts from webhooks where subject_id = ?", subject_id)


async def submit(client: InferQLClient, url: str, input: dict = SHORT) -> str:
    data = await client.execute(SUBMIT, {"input": input, "options": {"webhookUrl": url}})
    return data["submitGeneration"]["id"]


def tamper(body: bytes, needle: str) -> bytes:
    """The body with one character of `needle` (found in it) changed."""
    text = body.decode()
    i = text.index(needle)
    return (text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:]).encode()


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def hook_server(tmp_path_factory, tiny_model_dir):
    """Two retries 0.3 s apart: a failing delivery is tried 3 times, then given up."""
    tmp = tmp_path_factory.mktemp("webhook-server")
    server = ServerProcess(tmp, server_env(tiny_model_dir, tmp, "0.3,0.3"))
    try:
        server.start()
        yield server
    finally:
        stop(server)


@pytest.fixture
async def client(hook_server):
    async with InferQLClient(hook_server.url) as c:
        yield c


# ---- tests ----------------------------------------------------------------------------


async def test_delivery_is_signed_and_sent_exactly_once(client, receiver):
    url = receiver.route("ok", [200])
    job_id = await submit(client, url)
    (hit,) = await wait_hits(receiver, url, 1)

    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["webhook-id"].startswith("msg_")
    message = Webhook(SECRET).verify(hit.body, hit.headers)
    assert message["type"] == "job.succeeded"
    assert message["timestamp"]
    job = message["data"]["job"]
    assert job["id"] == job_id and job["status"] == "SUCCEEDED" and job["error"] is None
    result = job["result"]
    assert 0 < result["confidence"]["score"] <= 1
    assert result["model"]["id"] and result["model"]["version"]
    usage = result["usage"]
    assert usage["completionTokens"] >= 1 and usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"]

    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tamper(hit.body, job_id), hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(hit.body, hit.headers)

    deliveries = await wait_deliveries(client, job_id, 1)
    stored = await get_job(client, job_id)
    assert stored["status"] == "SUCCEEDED"
    assert stored["result"]["usage"] == usage  # the webhook carries the stored result
    await asyncio.sleep(1.0)  # a duplicate would show up by now
    assert len(receiver.hits(url)) == 1
    deliveries = (await get_job(client, job_id))["webhookDeliveries"]
    assert len(deliveries) == 1, deliveries
    (d,) = deliveries
    assert d["attempt"] == 1 and d["httpStatus"] == 200 and d["error"] is None and d["nextRetryAt"] is None
    assert d["outcome"] == "HTTP_2XX"


async def test_flaky_receiver_gets_three_attempts_of_one_message(client, receiver, hook_server):
    url = receiver.route("flaky", [500, 500, 200])
    job_id = await submit(client, url)
    hits = await wait_hits(receiver, url, 3)
    assert [h.status for h in hits] == [500, 500, 200]
    assert len({h.headers["webhook-id"] for h in hits}) == 1, "a retry must keep the webhook-id"
    bodies = {Webhook(SECRET).verify(h.body, h.headers)["data"]["job"]["id"] for h in hits}
    assert bodies == {job_id}

    deliveries = await wait_deliveries(client, job_id, 3)
    await asyncio.sleep(1.0)
    assert len(receiver.hits(url)) == 3, "nothing is sent after a 2xx"
    deliveries = (await get_job(client, job_id))["webhookDeliveries"]
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert [d["httpStatus"] for d in deliveries] == [500, 500, 200]
    assert [d["error"] for d in deliveries] == ["HTTP 500", "HTTP 500", None]
    assert [d["outcome"] for d in deliveries] == ["HTTP_5XX", "HTTP_5XX", "HTTP_2XX"]
    assert all(d["nextRetryAt"] and d["nextRetryAt"] > d["at"] for d in deliveries[:2]), deliveries
    assert deliveries[2]["nextRetryAt"] is None
    assert webhook_state(hook_server, job_id) == [("DELIVERED", 3)]


async def test_receiver_that_always_fails_gets_three_attempts_then_none(client, receiver, hook_server):
    url = receiver.route("down", [500])
    job_id = await submit(client, url)
    await wait_hits(receiver, url, 3)
    await wait_until(lambda: webhook_state(hook_server, job_id) == [("FAILED", 3)],
                     "the webhook to end FAILED after 3 attempts")
    await asyncio.sleep(1.5)  # several retry delays: a 4th attempt would have come
    assert len(receiver.hits(url)) == 3
    deliveries = (await get_job(client, job_id))["webhookDeliveries"]
    assert [(d["attempt"], d["httpStatus"]) for d in deliveries] == [(1, 500), (2, 500), (3, 500)]
    assert [d["nextRetryAt"] is not None for d in deliveries] == [True, True, False]
    assert webhook_state(hook_server, job_id) == [("FAILED", 3)]


async def test_unreachable_url_records_errors_without_status(client, hook_server):
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    job_id = await submit(client, url)
    await wait_until(lambda: webhook_state(hook_server, job_id) == [("FAILED", 3)],
                     "the webhook to an unreachable URL to end FAILED after 3 attempts")
    deliveries = (await get_job(client, job_id))["webhookDeliveries"]
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    for d in deliveries:  # a coarse outcome, never the client's exception text
        assert d["httpStatus"] is None, d
        assert d["outcome"] == "CONNECTION_REFUSED" and d["error"] == "connection refused", d
    assert [d["nextRetryAt"] is not None for d in deliveries] == [True, True, False]
    assert (await get_job(client, job_id))["status"] == "SUCCEEDED"  # the job itself is unaffected


async def test_many_concurrent_deliveries_each_arrive_exactly_once(client, receiver):
    """Rounds of 60 jobs finishing together, their webhooks answered after 0-20 ms so that
    deliveries overlap; up to 3 rounds, stopping at the first duplicate."""
    for _ in range(3):
        url = receiver.route("many", [200], max_delay=0.02)
        job_ids = await asyncio.gather(*(submit(client, url, {"prompt": f"Number {i}", "maxTokens": 2})
                                         for i in range(60)))
        await wait_hits(receiver, url, len(job_ids), timeout=60)
        await asyncio.sleep(1.0)  # duplicates would show up by now
        hits = receiver.hits(url)
        per_job = Counter(Webhook(SECRET).verify(h.body, h.headers)["data"]["job"]["id"] for h in hits)
        assert set(per_job) == set(job_ids)
        duplicated = {j: n for j, n in per_job.items() if n != 1}
        if duplicated:
            details = {j: (await get_job(client, j))["webhookDeliveries"] for j in duplicated}
            raise AssertionError(f"{len(duplicated)} of {len(job_ids)} webhooks were delivered more than once; "
                                 f"POSTs per job: {duplicated}; recorded attempts: {details}")
        assert len({h.headers["webhook-id"] for h in hits}) == len(job_ids)
        for job_id in job_ids:
            deliveries = (await get_job(client, job_id))["webhookDeliveries"]
            assert [(d["attempt"], d["httpStatus"]) for d in deliveries] == [(1, 200)], (job_id, deliveries)


BAD_URLS = {
    "ftp scheme": "ftp://x",
    "not a url": "not a url",
    "no host": "http://",
    "3000 chars": "http://example.com/" + "a" * 2981,
    "credentials": "http://user:pw@host/",
    "bad port": "http://example.com:99999/",
    "empty": "",
}


@pytest.mark.parametrize("url", BAD_URLS.values(), ids=BAD_URLS.keys())
async def test_invalid_webhook_url_is_refused_and_nothing_stored(client, hook_server, url):
    def counts():
        return sql(hook_server, "select (select count(*) from jobs), (select count(*) from batches)")[0]

    before = counts()
    body = await client.execute_raw(SUBMIT, {"input": SHORT, "options": {"webhookUrl": url}})
    assert body["data"] is None
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], body
    assert "webhookUrl" in body["errors"][0]["message"]
    body = await client.execute_raw(SUBMIT_BATCH, {"inputs": [SHORT, SHORT], "options": {"webhookUrl": url}})
    assert body["data"] is None
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], body
    assert counts() == before


async def test_batch_sends_one_signed_completion_webhook(client, receiver):
    url = receiver.route("batch", [200])
    inputs = [{"prompt": f"Item number {i}", "maxTokens": 4} for i in range(5)]
    batch_id = (await client.execute(SUBMIT_BATCH, {"inputs": inputs, "options": {"webhookUrl": url}}))[
        "submitBatch"]["id"]
    (hit,) = await wait_hits(receiver, url, 1)
    message = Webhook(SECRET).verify(hit.body, hit.headers)
    assert message["type"] == "batch.completed"
    sent = message["data"]["batch"]
    assert sent["id"] == batch_id and sent["status"] == "COMPLETED" and sent["size"] == 5
    assert sent["counts"]["succeeded"] == 5 and sent["counts"]["total"] == 5
    assert sent["counts"]["queued"] == sent["counts"]["running"] == sent["counts"]["failed"] == 0

    async def settled():
        b = (await client.execute(BATCH, {"id": batch_id}))["batch"]
        return b if b["webhookDeliveries"] else None
    batch = await wait_until(settled, "the batch delivery to be recorded")
    jobs = batch["jobs"]["nodes"]
    assert len(jobs) == 5 and all(j["status"] == "SUCCEEDED" and j["batchId"] == batch_id for j in jobs)
    job_tokens = sum(j["result"]["usage"]["completionTokens"] for j in jobs)
    assert sent["usage"]["completionTokens"] == job_tokens == batch["usage"]["completionTokens"]
    assert sent["usage"]["totalTokens"] == batch["usage"]["totalTokens"]

    await asyncio.sleep(1.0)
    assert len(receiver.hits(url)) == 1, "one webhook per batch"
    assert all(j["webhookDeliveries"] == [] for j in jobs), "batch jobs send no webhook of their own"
    (d,) = (await client.execute(BATCH, {"id": batch_id}))["batch"]["webhookDeliveries"]
    assert d["attempt"] == 1 and d["httpStatus"] == 200 and d["nextRetryAt"] is None


async def test_pending_delivery_survives_a_restart(tmp_path, tiny_model_dir, receiver):
    url = receiver.route("restart", [503])
    env = server_env(tiny_model_dir, tmp_path, "4,4")
    first = ServerProcess(tmp_path, env)
    second = None
    try:
        first.start()
        async with InferQLClient(first.url) as c:
            job_id = await submit(c, url)
            failed = await wait_deliveries(c, job_id, 1)
        assert failed[0]["httpStatus"] == 503 and failed[0]["nextRetryAt"] is not None
        first.stop()
        before_restart = len(receiver.hits(url))
        assert webhook_state(first, job_id) == [("PENDING", before_restart)]
        receiver.script(url.removeprefix(receiver.url), [200])  # the receiver is back up

        second = ServerProcess(tmp_path, {**env, "INFERQL_DATABASE_URL": first.env["INFERQL_DATABASE_URL"]})
        second.start()
        hits = await wait_hits(receiver, url, before_restart + 1, timeout=30)
        assert [h.status for h in hits] == [503] * before_restart + [200]
        assert len({h.headers["webhook-id"] for h in hits}) == 1
        message = Webhook(SECRET).verify(hits[-1].body, hits[-1].headers)
        assert message["type"] == "job.succeeded" and message["data"]["job"]["id"] == job_id

        async with InferQLClient(second.url) as c:
            deliveries = await wait_deliveries(c, job_id, before_restart + 1)
        assert [d["httpStatus"] for d in deliveries] == [503] * before_restart + [200]
        assert [d["attempt"] for d in deliveries] == list(range(1, before_restart + 2))
        assert deliveries[-1]["nextRetryAt"] is None
        assert webhook_state(second, job_id) == [("DELIVERED", before_restart + 1)]
    finally:
        stop(first)
        stop(second)


async def test_unusable_url_is_refused_or_given_up(tmp_path, tiny_model_dir):
    """Either refused at submission (BAD_USER_INPUT) or tried 3 times, recorded, and given up."""
    urls = {"DEL char": "http://127.0.0.1:9/\x7f", "bad IDNA": "http://xn--/"}
    server = ServerProcess(tmp_path, server_env(tiny_model_dir, tmp_path, "0.3,0.3"))
    try:
        server.start()
        async with InferQLClient(server.url) as c:
            accepted = {}
            for name, url in urls.items():
                body = await c.execute_raw(SUBMIT, {"input": SHORT, "options": {"webhookUrl": url}})
                if body.get("errors"):  # refused up front: fine
                    assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], (name, body)
                else:
                    accepted[name] = body["data"]["submitGeneration"]["id"]
            try:
                await wait_until(lambda: all(webhook_state(server, j) == [("FAILED", 3)] for j in accepted.values()),
                                 "each accepted delivery to be tried 3 times and given up", timeout=6)
            except AssertionError:
                report = {name: (webhook_state(server, j), (await get_job(c, j))["webhookDeliveries"])
                          for name, j in accepted.items()}
                crashes = server.log_path.read_text(errors="replace").count("delivery attempt crashed")
                raise AssertionError(f"(state, attempts) by URL: {report}; "
                                     f"'delivery attempt crashed' logged {crashes} times") from None
    finally:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()  # a server stuck in the loop shuts down slowly
        stop(server)
