"""API keys over HTTP and both websocket protocols, against a real server (tiny random model).

A missing, wrong, malformed or revoked key is refused with UNAUTHENTICATED (HTTP) or a
4403 close before any operation runs (graphql-transport-ws); every authenticated HTTP
response reports the caller's limits in `extensions.rateLimit`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
import websockets

from tests.conftest import ROOT, ServerProcess
from tests.gql import GENERATE, collect

MODELS = "{ models { id } }"
JOB_IDS = "{ jobs(first: 100) { nodes { id } } }"
TINY_INPUT = {"prompt": "Hello there", "maxTokens": 4}
WS_TIMEOUT = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess(tmp_path_factory.mktemp("auth"), {"INFERQL_MODEL_PATH": str(tiny_model_dir)}).start()
    yield srv
    srv.stop()


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=server.env,
                          capture_output=True, text=True, timeout=60)


async def post(server: ServerProcess, query: str, variables: dict | None = None, *,
               key: str | None = None, headers: dict | None = None) -> dict:
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.post(server.url + "/graphql", json={"query": query, "variables": variables or {}},
                               headers=hdrs)
    assert resp.status_code < 500, resp.text
    return resp.json()


def assert_unauthenticated(body: dict) -> None:
    assert body.get("data") is None, body
    error = body["errors"][0]
    assert error["extensions"]["code"] == "UNAUTHENTICATED", body
    assert "Authorization: Bearer" in error["message"], error  # tells how to send the key


async def assert_serves(server: ServerProcess) -> None:
    body = await post(server, MODELS, key=server.key)
    assert not body.get("errors"), body
    assert body["data"]["models"][0]["id"]


async def job_count(server: ServerProcess) -> int:
    body = await post(server, JOB_IDS, key=server.key)
    return len(body["data"]["jobs"]["nodes"])


async def ws_exchange(server: ServerProcess, messages: list[dict], protocol: str = "graphql-transport-ws",
                      listen: float = 3.0) -> tuple[list[dict], int | None]:
    """Sends `messages`, then reads until the server closes (or `listen` s of silence).

    Returns (messages received, close code sent by the server or None)."""
    ws_url = server.url.replace("http", "ws", 1) + "/graphql"
    received: list[dict] = []
    code = None
    async with websockets.connect(ws_url, subprotocols=[protocol], open_timeout=WS_TIMEOUT) as ws:
        try:
            for message in messages:
                await ws.send(json.dumps(message))
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), listen)))
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
        except TimeoutError:
            pass
    return received, code


def subscribe_msg(protocol: str = "graphql-transport-ws") -> dict:
    return {"id": "1", "type": "subscribe" if protocol == "graphql-transport-ws" else "start",
            "payload": {"query": GENERATE, "variables": {"input": TINY_INPUT}}}


# ---- HTTP -------------------------------------------------------------------------------------

BAD_HEADERS = {
    "no header": {},
    "wrong key": {"Authorization": "Bearer iq_wrong0000000000000000000000000000000000000000"},
    "not a key": {"Authorization": "Bearer hello"},
    "basic scheme": {"Authorization": "Basic x"},
    "bearer without token": {"Authorization": "Bearer"},
    "empty header": {"Authorization": ""},
    "overlong key": {"Authorization": "Bearer iq_" + "a" * 5000},
}


@pytest.mark.parametrize("headers", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
async def test_http_refuses_bad_credentials_then_serves(server, headers):
    body = await post(server, MODELS, headers=headers)
    assert_unauthenticated(body)
    assert "rateLimit" not in (body.get("extensions") or {})
    await assert_serves(server)


async def test_http_refuses_mutations_without_key(server):
    before = await job_count(server)
    body = await post(server, "mutation($i: GenerationInput!) { submitGeneration(input: $i) { id } }",
                      {"i": TINY_INPUT})
    assert_unauthenticated(body)
    assert await job_count(server) == before


async def test_revoked_key_is_refused_over_http_and_websocket(server):
    key = server.create_key("to-revoke")
    body = await post(server, MODELS, key=key)
    assert not body.get("errors") and body["data"]["models"]
    async with server.client(key) as client:  # the websocket works too, before revocation
        events = await collect(client, GENERATE, {"input": TINY_INPUT})
        assert events[-1]["__typename"] == "GenerationCompleted"

    out = cli(server, "keys", "revoke", "to-revoke")
    assert out.returncode == 0, out.stderr
    await asyncio.sleep(1.1)  # a key lookup is reused for INFERQL_KEY_CACHE_SECONDS (1 s)

    assert_unauthenticated(await post(server, MODELS, key=key))
    received, code = await ws_exchange(server, [
        {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}])
    assert code == 4403 and received == []
    # revoking again: nothing to revoke
    assert cli(server, "keys", "revoke", "to-revoke").returncode != 0
    await assert_serves(server)


async def test_every_authenticated_response_reports_rate_limits(server):
    key = server.create_key("rpm50", "--rpm", "50")
    remaining = []

    def check(body: dict) -> dict:
        state = body["extensions"]["rateLimit"]
        for part in ("requests", "tokens"):
            assert set(state[part]) >= {"limit", "remaining", "resetMs"}, state
            assert all(isinstance(state[part][f], int) for f in ("limit", "remaining", "resetMs")), state
            assert 0 <= state[part]["resetMs"] <= 60_000
        assert state["requests"]["limit"] == 50
        remaining.append(state["requests"]["remaining"])
        return state

    ok = await post(server, MODELS, key=key)  # success
    assert not ok.get("errors")
    check(ok)
    not_found = await post(server, 'mutation { cancelJob(id: "nope") { id } }', key=key)  # resolver error
    assert not_found["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    check(not_found)
    ok = await post(server, MODELS, key=key)
    check(ok)
    assert remaining == [49, 48, 47]  # one request each

    # A document refused before any field runs still reports the state (and costs no request).
    invalid = await post(server, "{ nope }", key=key)
    assert invalid["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    check(invalid)
    assert remaining[-1] == 47


# ---- websockets -------------------------------------------------------------------------------

BAD_INIT_PAYLOADS = {
    "no payload": None,
    "empty payload": {},
    "wrong key": {"Authorization": "Bearer iq_wrong0000000000000000000000000000000000000000"},
    "basic scheme": {"Authorization": "Basic abc"},
    "key not a string": {"Authorization": 12345},
}


@pytest.mark.parametrize("payload", BAD_INIT_PAYLOADS.values(), ids=BAD_INIT_PAYLOADS.keys())
async def test_transport_ws_closes_4403_before_any_operation(server, payload):
    before = await job_count(server)
    init = {"type": "connection_init"} if payload is None else {"type": "connection_init", "payload": payload}
    # The subscribe is pipelined right behind the init: it must never run.
    received, code = await ws_exchange(server, [init, subscribe_msg()])
    assert code == 4403, (code, received)
    assert not [m for m in received if m.get("type") in ("connection_ack", "next", "error", "complete")], received
    assert await job_count(server) == before
    await assert_serves(server)


async def test_transport_ws_good_key_gets_ack_with_rate_limits(server):
    ws_url = server.url.replace("http", "ws", 1) + "/graphql"
    async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"], open_timeout=WS_TIMEOUT) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {server.key}"}}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT))
    assert ack["type"] == "connection_ack"
    state = ack["payload"]["rateLimit"]
    for part in ("requests", "tokens"):
        assert set(state[part]) >= {"limit", "remaining", "resetMs"}, state
        assert state[part]["limit"] > 0 and 0 <= state[part]["remaining"] <= state[part]["limit"]


async def test_transport_ws_key_in_connection_params_streams(server):
    async with server.client() as client:
        events = await collect(client, GENERATE, {"input": TINY_INPUT})
        assert events[-1]["__typename"] == "GenerationCompleted"
        assert client.last_ack["rateLimit"]["requests"]["limit"] > 0


@pytest.mark.parametrize("payload", [None, {"Authorization": "Bearer iq_bad"}], ids=["no key", "wrong key"])
async def test_legacy_graphql_ws_refuses_bad_key(server, payload):
    before = await job_count(server)
    init = {"type": "connection_init", "payload": payload or {}}
    received, code = await ws_exchange(server, [init, subscribe_msg("graphql-ws")], protocol="graphql-ws")
    types = [m.get("type") for m in received]
    assert "connection_ack" not in types and "data" not in types, received
    assert "connection_error" in types or code is not None, (received, code)
    errors = [m for m in received if m.get("type") == "connection_error"]
    assert all("Authorization: Bearer" in json.dumps(m) for m in errors)
    assert await job_count(server) == before
    await assert_serves(server)


# ---- auth off ---------------------------------------------------------------------------------

async def test_auth_off_needs_no_key(tmp_path, tiny_model_dir):
    srv = ServerProcess(tmp_path, {"INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_AUTH": "off"}).start()
    try:
        assert srv.key is None  # no bootstrap key is made
        body = await post(srv, MODELS)
        assert not body.get("errors") and body["data"]["models"][0]["id"]
        async with srv.client() as client:  # no key, neither over HTTP nor in connection_init
            assert client.api_key is None
            events = await collect(client, GENERATE, {"input": TINY_INPUT})
            assert events[-1]["__typename"] == "GenerationCompleted"
    finally:
        srv.stop()


# ---- the CLI ----------------------------------------------------------------------------------

def test_keys_cli_prints_the_key_once(server):
    created = cli(server, "keys", "create", "--name", "cli-made", "--rpm", "7")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("iq_") and len(key) >= 40
    listing = cli(server, "keys", "list")
    assert listing.returncode == 0, listing.stderr
    assert key not in listing.stdout
    assert key[:10] in listing.stdout
    assert "cli-made" in listing.stdout and "rpm=7" in listing.stdout
    for other in (server.key,):
        assert other not in listing.stdout
    # a taken name is refused without printing a key
    again = cli(server, "keys", "create", "--name", "cli-made")
    assert again.returncode != 0 and "iq_" not in again.stdout
