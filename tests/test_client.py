"""app/client.py's send hook: it sees every websocket message, in order, before it is sent.

Against a minimal graphql-transport-ws / graphql-ws peer (no app, no model): it acks,
pings once, sends one result and completes, and records what it received.
"""

from __future__ import annotations

import json
import time

import pytest
import websockets

from app.client import LEGACY_WS, TRANSPORT_WS, InferQLClient


@pytest.fixture
async def peer():
    received: list[tuple[dict, float]] = []

    async def handler(ws) -> None:
        async def recv() -> dict:
            message = json.loads(await ws.recv())
            received.append((message, time.perf_counter()))
            return message

        await recv()  # connection_init
        await ws.send(json.dumps({"type": "connection_ack"}))
        start = await recv()
        if ws.subprotocol == TRANSPORT_WS:
            await ws.send(json.dumps({"type": "ping"}))
            await recv()  # pong
        kind = "next" if ws.subprotocol == TRANSPORT_WS else "data"
        await ws.send(json.dumps({"id": start["id"], "type": kind, "payload": {"data": {"n": 1}}}))
        await ws.send(json.dumps({"id": start["id"], "type": "complete"}))
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0, subprotocols=[TRANSPORT_WS, LEGACY_WS]) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", received


async def test_send_hook_sees_each_message_before_it_goes_out(peer):
    url, received = peer
    seen: list[tuple[dict, float]] = []
    async with InferQLClient(url, api_key="iq_test", on_send=lambda m: seen.append((m, time.perf_counter()))) as client:
        results = [data async for data in client.subscribe("subscription { n }", {"x": 1})]
    assert results == [{"n": 1}]
    assert [m["type"] for m, _ in seen] == ["connection_init", "subscribe", "pong"]
    assert seen[0][0]["payload"] == {"Authorization": "Bearer iq_test"}
    assert seen[1][0]["payload"] == {"query": "subscription { n }", "variables": {"x": 1}}
    # what the hook saw is exactly what was sent, and it saw it first
    assert [m for m, _ in seen] == [m for m, _ in received]
    assert all(t_hook <= t_recv for (_, t_hook), (_, t_recv) in zip(seen, received))


async def test_per_call_hook_overrides_the_clients(peer):
    url, _ = peer
    client_wide: list[dict] = []
    per_call: list[dict] = []
    async with InferQLClient(url, on_send=client_wide.append) as client:
        async for _ in client.subscribe("subscription { n }", protocol=LEGACY_WS, on_send=per_call.append):
            pass
    assert [m["type"] for m in per_call] == ["connection_init", "start"]
    assert client_wide == []


async def test_no_hook_is_the_old_behaviour(peer):
    url, received = peer
    async with InferQLClient(url) as client:
        assert [d async for d in client.subscribe("subscription { n }")] == [{"n": 1}]
    assert [m["type"] for m, _ in received] == ["connection_init", "subscribe", "pong"]
