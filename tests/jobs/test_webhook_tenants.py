"""Webhooks between tenants, on a real server with API keys and a real local receiver.

- Each key's webhooks are signed with that key's own secret (`inferql webhooks secret
  --key NAME`): another key's secret, or the server-wide one, does not verify them.
- A receiver that trickles its answer a byte at a time is cut off by the attempt's one
  deadline (TIMEOUT), and never holds more than its key's share of delivery slots: another
  key's webhook is delivered at once meanwhile.
- An answer that never ends is read only up to a few KB: the attempt counts as delivered
  on its 2xx status and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.conftest import ROOT, ServerProcess, wait_until
from tests.jobs.test_webhooks import DELIVERIES, SUBMIT, SUBMIT_BATCH, server_env, stop

TIMEOUT = 2.0  # INFERQL_WEBHOOK_TIMEOUT of the server: the deadline of one attempt

JOB = f"query Job($id: ID!) {{ job(id: $id) {{ id status {DELIVERIES} }} }}"
BATCH = f"query Batch($id: ID!) {{ batch(id: $id) {{ id status {DELIVERIES} }} }}"


class RawReceiver:
    """A TCP server on 127.0.0.1 speaking just enough HTTP/1.1. Each path has a behaviour:
    `ok` answers 200 at once; `trickle` sends its status line one byte every 0.25 s (for up
    to 30 s); `endless` answers 200 with a chunked body that never ends (1 KB every 10 ms, for
    up to 30 s). It records every request, how many connections of a path are open at
    once, and how many body bytes it managed to send."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.open: dict[str, int] = {}
        self.max_open: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.closed_at: dict[str, float] = {}
        self.stopping = threading.Event()
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(30)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, body = data.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                while len(body) < int(headers.get("content-length", 0)):
                    body += conn.recv(65536)
                behaviour = path.strip("/").split("-")[0]
                with receiver.lock:
                    receiver.requests.append({"path": path, "headers": headers, "body": body, "at": time.monotonic()})
                    receiver.open[path] = receiver.open.get(path, 0) + 1
                    receiver.max_open[path] = max(receiver.max_open.get(path, 0), receiver.open[path])
                try:
                    getattr(receiver, f"_{behaviour}")(conn, path)
                except OSError:
                    pass  # the client went away
                finally:
                    with receiver.lock:
                        receiver.open[path] -= 1
                        receiver.closed_at[path] = time.monotonic()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _ok(self, conn: socket.socket, path: str) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    @staticmethod
    def _client_gone(conn: socket.socket, wait: float) -> bool:
        """Waits up to `wait` s; True as soon as the client closes its end."""
        readable, _, _ = select.select([conn], [], [], wait)
        return bool(readable) and not conn.recv(1, socket.MSG_PEEK)

    def _trickle(self, conn: socket.socket, path: str) -> None:
        deadline = time.monotonic() + 30
        for byte in b"HTTP/1.1 200 OK\r\n" * 100:
            if self.stopping.is_set() or time.monotonic() > deadline:
                return
            conn.sendall(bytes([byte]))
            if self._client_gone(conn, 0.25):
                return

    def _endless(self, conn: socket.socket, path: str) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
        deadline = time.monotonic() + 30
        while not self.stopping.is_set() and time.monotonic() < deadline:
            conn.sendall(chunk)
            with self.lock:
                self.sent[path] = self.sent.get(path, 0) + 1024
            if self._client_gone(conn, 0.01):
                return

    def route(self, behaviour: str) -> str:
        return f"{self.url}/{behaviour}-{uuid.uuid4().hex[:8]}"

    def hits(self, url: str) -> list[dict]:
        path = url.removeprefix(self.url)
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def hits_under(self, prefix: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].startswith(prefix)]

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def cli(server: ServerProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=server.env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def receiver():
    r = RawReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory, tiny_model_dir):
    """Auth on (API keys), local receivers allowed, a 2 s deadline per attempt, and the
    first retry a minute away (so each test sees first attempts only)."""
    tmp = tmp_path_factory.mktemp("tenant-server")
    env = server_env(tiny_model_dir, tmp, "60", INFERQL_AUTH="on", INFERQL_WEBHOOK_TIMEOUT=str(TIMEOUT))
    del env["INFERQL_WEBHOOK_SECRET"]  # generated into the data folder, as by default
    server = ServerProcess(tmp, env)
    try:
        server.start()
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="module")
def keys(tenant_server):
    return {name: tenant_server.create_key(name) for name in ("alice", "bob")}


async def submit(server: ServerProcess, key: str, url: str, n: int = 1) -> list[str]:
    async with server.client(key) as client:
        return list(await asyncio.gather(*(
            client.execute(SUBMIT, {"input": {"prompt": f"Hello {i}", "maxTokens": 2},
                                    "options": {"webhookUrl": url}})
            for i in range(n))))


def ids(results: list[dict]) -> list[str]:
    return [r["submitGeneration"]["id"] for r in results]


async def test_each_key_signs_its_webhooks_with_its_own_secret(tenant_server, keys, receiver):
    secrets = {name: cli(tenant_server, "webhooks", "secret", "--key", name) for name in keys}
    server_secret = cli(tenant_server, "webhooks", "secret")
    assert len({*secrets.values(), server_secret}) == 3
    assert all(s.startswith("whsec_") for s in secrets.values())
    assert cli(tenant_server, "webhooks", "secret", "--key", "alice") == secrets["alice"]  # stable

    urls = {name: receiver.route("ok") for name in keys}
    jobs = {name: ids(await submit(tenant_server, keys[name], urls[name]))[0] for name in keys}
    async with tenant_server.client(keys["alice"]) as client:
        batch_url = receiver.route("ok")
        batch_id = (await client.execute(SUBMIT_BATCH, {"inputs": [{"prompt": "Hi", "maxTokens": 2}],
                                                        "options": {"webhookUrl": batch_url}}))["submitBatch"]["id"]
    for name, url in [*urls.items(), ("alice", batch_url)]:
        (hit,) = await wait_until(lambda url=url: receiver.hits(url), f"{name}'s webhook", timeout=20)
        message = Webhook(secrets[name]).verify(hit["body"], hit["headers"])
        subject = message["data"].get("job") or message["data"]["batch"]
        assert subject["id"] in (jobs[name], batch_id)
        for other in [s for n, s in secrets.items() if n != name] + [server_secret]:
            with pytest.raises(WebhookVerificationError):
                Webhook(other).verify(hit["body"], hit["headers"])

    out = subprocess.run([sys.executable, "-m", "app.cli", "webhooks", "secret", "--key", "nobody"], cwd=ROOT,
                         env=tenant_server.env, capture_output=True, text=True)
    assert out.returncode == 1 and "nobody" in out.stderr and "whsec_" not in out.stdout


async def test_one_keys_trickling_receivers_do_not_hold_up_another_keys_webhook(tenant_server, keys, receiver):
    """alice's 8 receivers trickle their answers; bob's webhook must not wait for them."""
    prefix = f"/trickle-{uuid.uuid4().hex[:6]}"
    alice_urls = [f"{receiver.url}{prefix}{i}" for i in range(8)]
    started = time.monotonic()
    alice_jobs = []
    for url in alice_urls:
        alice_jobs += ids(await submit(tenant_server, keys["alice"], url))
    await wait_until(lambda: receiver.hits_under(prefix), "alice's receivers to be called", timeout=20)

    bob_url = receiver.route("ok")
    submitted = time.monotonic()
    (bob_job,) = ids(await submit(tenant_server, keys["bob"], bob_url))
    (hit,) = await wait_until(lambda: receiver.hits(bob_url), "bob's webhook", timeout=12)
    assert hit["at"] - submitted < TIMEOUT, "bob's webhook waited for alice's receivers"

    # alice's attempts each end at the deadline, at most 2 of them at once.
    async with tenant_server.client(keys["alice"]) as client:
        async def all_recorded():
            jobs = [(await client.execute(JOB, {"id": j}))["job"] for j in alice_jobs]
            return jobs if all(j["webhookDeliveries"] for j in jobs) else None
        jobs = await wait_until(all_recorded, "every alice webhook attempt to be recorded", timeout=30)
    elapsed = time.monotonic() - started
    for job in jobs:
        (d,) = job["webhookDeliveries"]
        assert (d["outcome"], d["httpStatus"], d["error"]) == ("TIMEOUT", None, "timed out"), d
        assert d["nextRetryAt"] is not None
    assert max(receiver.max_open.get(r["path"], 0) for r in receiver.hits_under(prefix)) == 1
    with receiver.lock:
        assert sum(1 for r in receiver.requests if r["path"].startswith(prefix)) == 8
    # 8 attempts of 2 s, 2 at a time: about 8 s; each attempt ends at its deadline.
    assert elapsed < 8 * TIMEOUT + 10, elapsed
    async with tenant_server.client(keys["bob"]) as client:
        (d,) = (await client.execute(JOB, {"id": bob_job}))["job"]["webhookDeliveries"]
    assert (d["outcome"], d["httpStatus"]) == ("HTTP_2XX", 200)


async def test_alice_never_has_more_than_two_attempts_at_once(tenant_server, keys, receiver):
    url = receiver.route("trickle")
    alice_jobs = ids(await submit(tenant_server, keys["alice"], url, n=6))
    await wait_until(lambda: len(receiver.hits(url)) >= 2, "alice's first attempts", timeout=20)
    async with tenant_server.client(keys["alice"]) as client:
        async def all_recorded():
            jobs = [(await client.execute(JOB, {"id": j}))["job"] for j in alice_jobs]
            return jobs if all(j["webhookDeliveries"] for j in jobs) else None
        await wait_until(all_recorded, "every attempt to be recorded", timeout=40)
    assert len(receiver.hits(url)) == 6
    assert receiver.max_open[url.removeprefix(receiver.url)] == 2


async def test_an_endless_answer_is_cut_short(tenant_server, keys, receiver):
    url = receiver.route("endless")
    (job_id,) = ids(await submit(tenant_server, keys["alice"], url))
    path = url.removeprefix(receiver.url)
    (hit,) = await wait_until(lambda: receiver.hits(url), "the webhook", timeout=20)
    await wait_until(lambda: path in receiver.closed_at, "the server to drop the connection", timeout=3 * TIMEOUT)
    assert receiver.closed_at[path] - hit["at"] < TIMEOUT
    assert receiver.sent.get(path, 0) < 2_000_000  # what socket buffers hold, not the endless rest
    async with tenant_server.client(keys["alice"]) as client:
        async def recorded():
            return (await client.execute(JOB, {"id": job_id}))["job"]["webhookDeliveries"]
        (d,) = await wait_until(recorded, "the attempt to be recorded", timeout=10)
    assert (d["outcome"], d["httpStatus"], d["error"], d["nextRetryAt"]) == ("HTTP_2XX", 200, None, None)
