"""Subscriptions over HTTP count against their key; the JSON media type is negotiated."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, StreamingResponse

from app.api.http_streams import HttpStreams, LineFeedSSE, wants_graphql_response
from app.jobs.domain import Caller


def caller(key_id: str) -> Caller:
    return Caller(key_id=key_id, name=key_id, admin=False)


def test_media_type_negotiation():
    assert wants_graphql_response("application/graphql-response+json")
    assert wants_graphql_response("application/graphql-response+json, application/json")
    assert wants_graphql_response("application/json;q=0.9, application/graphql-response+json")
    assert not wants_graphql_response("application/json")
    assert not wants_graphql_response("application/json, application/graphql-response+json;q=0.5")
    assert not wants_graphql_response(None)
    assert not wants_graphql_response("*/*")
    assert not wants_graphql_response("application/graphql-response+json;q=0")


async def test_open_streams_are_counted_per_key_until_they_end():
    streams = HttpStreams(max_per_key=2)
    events: list[str] = []

    def stream():
        async def body():
            events.append("start")
            yield "event: next\n"
        return StreamingResponse(body())

    async def open_one(key: str):
        return await streams.run(caller(key), lambda: _ready(stream()))

    first, second = await open_one("a"), await open_one("a")
    refused = await open_one("a")
    assert refused.status_code == 429 and b"RATE_LIMITED" in refused.body
    assert (await open_one("b")).status_code == 200  # another key has its own count
    sent = await _serve(first)  # the stream runs to its end: its slot is free again
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert streams.open["a"] == 1
    assert (await open_one("a")).status_code == 200
    await _serve(second, disconnect=True)  # a client gone before the first event frees its slot too
    assert streams.open["a"] == 1


async def test_a_json_answer_holds_no_slot():
    streams = HttpStreams(max_per_key=1)
    for _ in range(3):
        response = await streams.run(caller("a"), lambda: _ready(JSONResponse({"errors": []})))
        assert response.status_code == 200
    assert streams.open == {}


def test_sse_events_end_lines_with_lf():
    sse = LineFeedSSE()
    assert sse.encode_event("next", '{"data":1}') == 'event: next\ndata: {"data":1}\n\n'
    assert "\r" not in sse.encode_complete() + sse.heartbeat_message(str)


async def _ready(value):
    return value


async def _serve(response, disconnect: bool = False) -> list[dict]:
    """Sends the response as the ASGI server would; `disconnect`: the client has already left."""
    sent = []

    async def receive():
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        if disconnect and message["type"] == "http.response.body":
            raise OSError("client gone")
        sent.append(message)

    try:
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    except ClientDisconnect:
        pass
    return sent
