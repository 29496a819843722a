"""Websocket connections against a real server (tiny random model): the connection_init
timeout on both protocols, open connections per key and unauthenticated ones per address,
a revoked key's open connections closed, and the message cap however the app is started."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import websockets

from tests.conftest import ROOT, ServerProcess, wait_until

MODELS = "{ models { id } }"
WS_TIMEOUT = 10
PER_KEY = 2
UNAUTHENTICATED = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess(tmp_path_factory.mktemp("ws-conn"), {
        "INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_CONNECTION_INIT_WAIT_TIMEOUT": "1",
        "INFERQL_MAX_WS_PER_KEY": str(PER_KEY), "INFERQL_MAX_WS_UNAUTHENTICATED_PER_ADDRESS": str(UNAUTHENTICATED),
        "INFERQL_KEY_CACHE_SECONDS": "1",
    }).start()
    yield srv
    srv.stop()


def ws_url(server: ServerProcess) -> str:
    return server.url.replace("http", "ws", 1) + "/graphql"


def init(key: str) -> str:
    return json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}})


async def connect(server: ServerProcess, key: str | None, protocol: str = "graphql-transport-ws"):
    """An open websocket, acknowledged when a key is given."""
    ws = await websockets.connect(ws_url(server), subprotocols=[protocol], open_timeout=WS_TIMEOUT)
    if key is not None:
        await ws.send(init(key))
        ack = json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT))
        assert ack["type"] == "connection_ack", ack
    return ws


async def close_code(ws, timeout: float = WS_TIMEOUT) -> int | None:
    """Reads until the server closes; its close code."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return closed.value.rcvd.code if closed.value.rcvd else None


async def assert_serves(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {server.key}"}) as http:
        body = (await http.post(server.url + "/graphql", json={"query": MODELS})).json()
    assert body["data"]["models"][0]["id"], body


async def test_legacy_graphql_ws_without_connection_init_is_closed_4408(server):
    started = time.monotonic()
    ws = await connect(server, None, protocol="graphql-ws")
    assert await close_code(ws) == 4408
    assert time.monotonic() - started < 5  # the timeout is 1 s
    await assert_serves(server)


@pytest.mark.parametrize("protocol", ["graphql-transport-ws", "graphql-ws"])
async def test_open_websockets_per_key_are_capped(server, protocol):
    key = server.create_key(f"cap-{protocol}")
    held = [await connect(server, key, protocol) for _ in range(PER_KEY)]
    extra = await connect(server, None, protocol)
    await extra.send(init(key))
    assert await close_code(extra) == 4429
    # another key is not affected, and a closed connection frees its slot
    other = await connect(server, server.key, protocol)
    await held.pop().close()
    await wait_until(lambda: _try_connect(server, key, protocol), "a freed slot", timeout=10)
    for ws in [*held, other]:
        await ws.close()


async def _try_connect(server, key, protocol) -> bool:
    async with websockets.connect(ws_url(server), subprotocols=[protocol], open_timeout=WS_TIMEOUT) as ws:
        await ws.send(init(key))
        try:
            return json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT)).get("type") == "connection_ack"
        except websockets.ConnectionClosed:
            return False


async def test_unauthenticated_websockets_per_address_are_capped(server):
    waiting = [await connect(server, None) for _ in range(UNAUTHENTICATED)]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(server, None)
    assert refused.value.response.status_code == 429
    # once one of them authenticates, its place is free
    await waiting[0].send(init(server.key))
    assert json.loads(await asyncio.wait_for(waiting[0].recv(), WS_TIMEOUT))["type"] == "connection_ack"
    late = await connect(server, server.key)
    for ws in [*waiting, late]:
        await ws.close()
    await assert_serves(server)


async def test_revoked_key_loses_its_open_websockets(server):
    key = server.create_key("revoked-while-open")
    modern = await connect(server, key)
    legacy = await connect(server, key, protocol="graphql-ws")
    # an operation in flight on it: jobEvents of an unknown job ends at once, so follow models
    await modern.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": MODELS}}))
    assert json.loads(await asyncio.wait_for(modern.recv(), WS_TIMEOUT))["type"] == "next"
    out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "revoke", "revoked-while-open"], cwd=ROOT,
                         env=server.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    revoked = time.monotonic()
    codes = await asyncio.gather(close_code(modern), close_code(legacy))
    assert codes == [4403, 4403]
    # INFERQL_KEY_CACHE_SECONDS is 1: closed within it (plus slack for a busy machine)
    assert time.monotonic() - revoked < 1.0 + 1.0
    # and the key cannot come back (once the HTTP side's cached lookup has expired too)
    await asyncio.sleep(1.1)
    again = await connect(server, None)
    await again.send(init(key))
    assert await close_code(again) == 4403
    await assert_serves(server)


# ---- the message cap holds however the app is started -----------------------------------------

class FactoryServer(ServerProcess):
    """`uvicorn --factory app.main:create_app`, without `inferql serve`'s ws_max_size."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(self.port),
                "--log-level", "warning"]


async def test_message_cap_holds_under_uvicorn_factory(tmp_path, tiny_model_dir):
    srv = FactoryServer(tmp_path, {"INFERQL_MODEL_PATH": str(tiny_model_dir), "INFERQL_AUTH": "off",
                                   "INFERQL_MAX_BODY_BYTES": "100000"}).start()
    try:
        for protocol, subscribe in [("graphql-transport-ws", "subscribe"), ("graphql-ws", "start")]:
            ws = await connect(srv, "unused", protocol)
            await ws.send(json.dumps({"id": "1", "type": subscribe,
                                      "payload": {"query": MODELS, "variables": {"pad": "x" * 150_000}}}))
            assert await close_code(ws) == 1009
        # a message under the cap is fine, and so is the next connection
        ws = await connect(srv, "unused")
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": MODELS, "variables": {"pad": "é" * 40_000}}}, ensure_ascii=False))
        message = json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT))
        assert message["type"] == "next" and message["payload"]["data"]["models"][0]["id"], message
        await ws.close()
        # multi-byte text counts in bytes: 60k characters of 2 bytes each are over the 100k cap
        ws = await connect(srv, "unused")
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": MODELS, "variables": {"pad": "é" * 60_000}}}, ensure_ascii=False))
        assert await close_code(ws) == 1009
    finally:
        srv.stop()
