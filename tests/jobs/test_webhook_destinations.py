"""Webhooks cannot reach the server's own network.

Unit level: which addresses count as public, the submit-time check of literal addresses,
and the dispatcher itself (a real database, real local receivers, a scripted resolver):
a host is resolved once per attempt, a non-public answer is refused, the connection goes
to the address that was checked, and Host, TLS SNI and the certificate check keep the
URL's host name. Server level: a server with the default settings refuses literal
internal addresses at submission and blocks a host name that resolves to loopback when
it sends, without ever calling it.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import stat
import subprocess
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from app.client import InferQLClient
from app.jobs.persistence.db import Database
from app.jobs.errors import InvalidInput
from app.jobs.persistence.migrate import upgrade
from app.jobs.persistence.tables import WebhookAttemptRow, WebhookRow
from app.jobs.validation import ip_literal, is_public_address, validate_webhook_url
from app.jobs.webhook_secrets import load_or_create_secret
from app.jobs.webhooks import WebhookDispatcher
from app.settings import Settings
from tests.conftest import ServerProcess, wait_until
from tests.jobs.test_webhooks import SHORT, SUBMIT, SUBMIT_BATCH, Receiver, get_job, server_env, stop, webhook_state

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()

NOT_PUBLIC = [
    "127.0.0.1", "127.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.1", "0177.0.0.1", "0", "0.0.0.0",
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254", "198.18.0.1", "192.0.2.1",
    "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "fd12::1", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::127.0.0.1", "::ffff:0:7f00:1",
    "2002:7f00:1::1", "2002:a9fe:a9fe::", "64:ff9b::127.0.0.1", "64:ff9b::169.254.169.254",
    "64:ff9b:1::1", "2001::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2001:4860:4860::8888", "2606:4700:4700::1111",
          "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_internal_addresses_are_not_public(address):
    ip = ip_literal(address)
    assert ip is not None, address
    assert not is_public_address(ip), address


@pytest.mark.parametrize("address", PUBLIC)
def test_global_addresses_are_public(address):
    assert is_public_address(ip_literal(address)), address


def test_host_names_are_not_literals():
    for name in ["example.com", "cafe.be", "deadbeef", "localhost", "1e10", "xn--bcher-kva.de"]:
        assert ip_literal(name) is None, name


def _url(address: str) -> str:
    return f"http://[{address}]:8080/hook" if ":" in address else f"http://{address}:8080/hook"


def test_submit_refuses_non_public_literal_addresses():
    for address in NOT_PUBLIC:
        with pytest.raises(InvalidInput) as refused:
            validate_webhook_url(_url(address), allow_private=False)
        assert refused.value.extensions["field"] == "webhookUrl"
        # (httpx itself refuses a dotted quad with an octal part, such as 0177.0.0.1)
        assert "public address" in refused.value.message or "can be called" in refused.value.message
        if "can be called" not in refused.value.message:
            validate_webhook_url(_url(address), allow_private=True)  # local development and tests
    for address in PUBLIC:
        validate_webhook_url(_url(address), allow_private=False)
    validate_webhook_url("https://hooks.example.com/x", allow_private=False)  # names: checked when sent


def test_the_allow_private_setting_is_off_by_default_and_the_secret_is_not_printed():
    settings = Settings(_env_file=None, webhook_secret="whsec_do-not-print-me")
    assert settings.webhook_allow_private is False
    assert "do-not-print-me" not in repr(settings) and "do-not-print-me" not in str(settings.model_dump())
    assert settings.webhook_secret.get_secret_value() == "whsec_do-not-print-me"


# ---- the server-wide secret file ---------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_secret_file_is_private(tmp_path):
    old = os.umask(0)
    try:
        secret = load_or_create_secret(tmp_path / "data")
    finally:
        os.umask(old)
    path = tmp_path / "data" / "webhook-secret"
    assert _mode(path) == 0o600
    assert path.read_text().strip() == secret and secret.startswith("whsec_")
    Webhook(secret)  # a valid secret
    assert load_or_create_secret(tmp_path / "data") == secret
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["webhook-secret"]  # no temporary file left


def test_an_empty_or_readable_secret_file_is_replaced_or_tightened(tmp_path):
    path = tmp_path / "webhook-secret"
    path.write_text("")
    path.chmod(0o644)
    secret = load_or_create_secret(tmp_path)
    assert secret.startswith("whsec_") and path.read_text().strip() == secret
    assert _mode(path) == 0o600
    path.chmod(0o644)
    assert load_or_create_secret(tmp_path) == secret
    assert _mode(path) == 0o600


# ---- the dispatcher against real receivers ------------------------------------------------


class Hits:
    """A local HTTP(S) receiver that records each request's path, Host header and TLS SNI."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict] = []
        self.sni: list[str | None] = []
        hits = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                hits.requests.append({"path": self.path, "host": self.headers["host"], "body": body,
                                      "headers": {k.lower(): v for k, v in self.headers.items()}})
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ScriptedResolver:
    """Answers each lookup of a name with the next of its scripted address lists (the last repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        n = sum(1 for h in self.calls if h == host)
        self.calls.append(host)
        script = self.answers.get(host)
        if not script:
            raise OSError("no such name")
        return script[min(n, len(script) - 1)]


@pytest.fixture
async def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'hooks.db'}")
    await upgrade(database.engine)
    yield database
    await database.dispose()


async def deliver(db: Database, url: str, **dispatcher_args) -> WebhookAttemptRow:
    """Queues one message to url, runs a dispatcher until its first attempt is recorded."""
    now = datetime.now(UTC)
    row = WebhookRow(id=f"msg_{uuid.uuid4().hex}", subject_type="job", subject_id=str(uuid.uuid4()),
                     event_type="job.succeeded", url=url, payload_json='{"type":"job.succeeded","data":{}}',
                     state="PENDING", next_attempt_at=now, created_at=now)
    await db.transaction(lambda session: session.add(row))
    dispatcher = WebhookDispatcher(db, SECRET, [60.0], timeout=3.0, **dispatcher_args)
    dispatcher.start()
    try:
        async def attempted():
            from sqlmodel import select
            return await db.read(lambda s: s.exec(select(WebhookAttemptRow)
                                                  .where(WebhookAttemptRow.webhook_id == row.id)).first())
        return await wait_until(attempted, f"an attempt at {url}", timeout=10)
    finally:
        await dispatcher.stop()


async def test_a_name_that_resolves_to_loopback_is_blocked_and_never_called(db):
    receiver = Hits()
    try:
        for answer in (["127.0.0.1"], ["93.184.215.14", "127.0.0.1"], ["::ffff:127.0.0.1"], ["169.254.169.254"]):
            resolver = ScriptedResolver({"hooks.example.com": [answer]})
            attempt = await deliver(db, f"http://hooks.example.com:{receiver.port}/x", resolver=resolver,
                                    allow_private=False)
            assert (attempt.outcome, attempt.http_status, attempt.error) == (
                "BLOCKED_DESTINATION", None, "the host is not a public address"), answer
        attempt = await deliver(db, f"http://localhost:{receiver.port}/x", allow_private=False)  # the real resolver
        assert attempt.outcome == "BLOCKED_DESTINATION"
        assert receiver.requests == []
    finally:
        receiver.close()


async def test_the_connection_goes_to_the_address_that_was_checked(db):
    """One lookup per attempt: a second answer (DNS rebinding) is never asked for. The
    request still names the URL's host."""
    receiver = Hits()
    try:
        resolver = ScriptedResolver({"hooks.example.com": [["127.0.0.1"], ["127.0.0.2"]]})
        attempt = await deliver(db, f"http://hooks.example.com:{receiver.port}/pinned", resolver=resolver,
                                allow_private=True)
        assert (attempt.outcome, attempt.http_status, attempt.error) == ("HTTP_2XX", 200, None)
        assert resolver.calls == ["hooks.example.com"]
        (request,) = receiver.requests
        assert request["path"] == "/pinned" and request["host"] == f"hooks.example.com:{receiver.port}"
        Webhook(SECRET).verify(request["body"], request["headers"])
    finally:
        receiver.close()


async def test_unresolvable_and_refused_destinations_get_coarse_outcomes(db):
    attempt = await deliver(db, "http://nowhere.example.com/x", resolver=ScriptedResolver({}), allow_private=True)
    assert (attempt.outcome, attempt.http_status, attempt.error) == ("DNS_ERROR", None,
                                                                     "the host name does not resolve")
    receiver = Hits()
    port = receiver.port
    receiver.close()  # nothing listens there now
    attempt = await deliver(db, f"http://127.0.0.1:{port}/x", allow_private=True)
    assert (attempt.outcome, attempt.http_status, attempt.error) == ("CONNECTION_REFUSED", None,
                                                                     "connection refused")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for hooks.example.com."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=hooks.example.com",
                    "-addext", "subjectAltName=DNS:hooks.example.com"], check=True, capture_output=True)
    return cert, key


async def test_tls_keeps_the_host_name_for_sni_and_the_certificate(db, certificate):
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    receiver = Hits(tls=server_tls)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        resolver = ScriptedResolver({"hooks.example.com": [["127.0.0.1"]], "other.example.com": [["127.0.0.1"]]})
        attempt = await deliver(db, f"https://hooks.example.com:{receiver.port}/tls", resolver=resolver,
                                allow_private=True, verify=trust)
        assert (attempt.outcome, attempt.http_status) == ("HTTP_2XX", 200)
        assert receiver.sni == ["hooks.example.com"]
        assert receiver.requests[0]["host"] == f"hooks.example.com:{receiver.port}"

        # The same address under a name the certificate does not cover: refused by verification.
        attempt = await deliver(db, f"https://other.example.com:{receiver.port}/tls", resolver=resolver,
                                allow_private=True, verify=trust)
        assert (attempt.outcome, attempt.http_status, attempt.error) == (
            "TLS_ERROR", None, "TLS handshake or certificate verification failed")
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


# ---- a server with the default settings --------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory, tiny_model_dir):
    """The defaults: INFERQL_WEBHOOK_ALLOW_PRIVATE unset. Two retries 0.3 s apart."""
    tmp = tmp_path_factory.mktemp("guarded-server")
    env = server_env(tiny_model_dir, tmp, "0.3,0.3")
    del env["INFERQL_WEBHOOK_ALLOW_PRIVATE"]
    server = ServerProcess(tmp, env)
    try:
        server.start()
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="module")
def local_receiver():
    r = Receiver().start()
    yield r
    r.stop()


async def test_server_refuses_internal_literal_addresses_at_submission(guarded_server, local_receiver):
    port = local_receiver.url.rsplit(":", 1)[1]
    urls = [f"http://127.0.0.1:{port}/x", f"http://[::1]:{port}/x", "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/x", "http://2130706433/x", "http://0x7f.1/x", "http://127.1/x", "http://0/x",
            f"http://[::ffff:127.0.0.1]:{port}/x", "http://[fd00::1]/x", "http://192.168.0.1/x"]

    def counts():
        return guarded_server.sql("select (select count(*) from jobs), (select count(*) from batches)")[0]

    before = counts()
    async with InferQLClient(guarded_server.url) as client:
        for url in urls:
            for query, variables in ((SUBMIT, {"input": SHORT}), (SUBMIT_BATCH, {"inputs": [SHORT]})):
                body = await client.execute_raw(query, {**variables, "options": {"webhookUrl": url}})
                assert body["data"] is None, (url, body)
                assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], (url, body)
                assert "webhookUrl" in body["errors"][0]["message"]
    assert counts() == before
    assert local_receiver.hits(f"{local_receiver.url}/x") == []


async def test_server_blocks_a_name_that_resolves_to_loopback_when_sending(guarded_server, local_receiver):
    """`localhost` passes submission (it is a name), but every attempt is refused before
    connecting, and the owner sees only the coarse outcome."""
    url = local_receiver.route("internal", [200]).replace("127.0.0.1", "localhost")
    async with InferQLClient(guarded_server.url) as client:
        job_id = (await client.execute(SUBMIT, {"input": SHORT, "options": {"webhookUrl": url}}))[
            "submitGeneration"]["id"]
        await wait_until(lambda: webhook_state(guarded_server, job_id) == [("FAILED", 3)],
                         "the webhook to localhost to be refused 3 times and given up", timeout=20)
        job = await get_job(client, job_id)
    assert job["status"] == "SUCCEEDED"
    assert [(d["attempt"], d["outcome"], d["httpStatus"], d["error"]) for d in job["webhookDeliveries"]] == [
        (n, "BLOCKED_DESTINATION", None, "the host is not a public address") for n in (1, 2, 3)]
    assert local_receiver.hits(url.replace("localhost", "127.0.0.1")) == []
