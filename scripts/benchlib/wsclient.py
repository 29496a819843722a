"""A lean graphql-transport-ws client: the streaming phases' load generator.

On a 2-core machine whose cores the engine keeps busy, the client's CPU per token competes
with the server it measures, and the direct phase has no such client. This one keeps
`websockets`' sans-I/O protocol for the handshake and the framing and drops the rest of its
asyncio connection (a reader task, a frame assembler, a queue hop per message): an
asyncio.Protocol feeds received bytes to it and each message is handled in data_received,
by a callback, with no task woken per message.

Measured by the bench's per-phase CPU figures (a Xeon with AMX, README "Figures", runs G0-G2):
45-78 us per token at 16-64 streams and 208-291 us at 1 stream, against 52-78 and 270-312 us
for `app.client`. About the same: most of a client's cost per token there is being woken once
per token with cold caches, not the code per message. A real client runs on another machine;
`--ws-client websockets` measures with `app.client`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

PROTOCOL = "graphql-transport-ws"


class _Connection(asyncio.Protocol):
    """One websocket running one subscription: every text message goes to `on_message` as it
    arrives; `done` settles with the subscription's end (complete, an error, a lost
    connection)."""

    def __init__(self, ws: ClientProtocol, on_message: Callable[[_Connection, dict], None]) -> None:
        self.ws = ws
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws.send_request(self.ws.connect())
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if self.done.done():
                break
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    try:
                        self.on_message(self, json.loads(event.data))
                    except Exception as exc:
                        self.finish(exc)
            elif isinstance(event, Response):
                if self.ws.handshake_exc is not None:
                    self.finish(self.ws.handshake_exc)
                else:
                    self.on_message(self, {"type": "handshake"})
        self.flush()  # pongs, close frames

    def connection_lost(self, exc) -> None:
        self.finish(ConnectionError("the server closed the connection"))

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def flush(self) -> None:
        data = self.ws.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(data))

    def send(self, message: dict) -> None:
        self.ws.send_text(json.dumps(message).encode())
        self.flush()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.ws.send_close()
            self.flush()
            self.transport.close()


class LeanSubscriptions:
    """One graphql-transport-ws subscription per websocket: `run` calls `on_data` with each
    result's `data` and returns at its `complete`; an error result raises."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.ws_url = base_url.replace("http", "ws", 1) + "/graphql"
        self.init = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._ids = itertools.count(1)

    async def run(self, query: str, variables: dict | None, *, on_data: Callable[[dict], None],
                  on_send: Callable[[dict], None] | None = None) -> None:
        uri = parse_uri(self.ws_url)
        op_id = str(next(self._ids))

        def send(conn: _Connection, message: dict) -> None:
            if on_send is not None:
                on_send(message)
            conn.send(message)

        def on_message(conn: _Connection, msg: dict) -> None:
            kind = msg.get("type")
            if kind == "next":
                if msg["payload"].get("errors"):
                    raise RuntimeError(f"GraphQL errors: {msg['payload']['errors']}")
                on_data(msg["payload"]["data"])
            elif kind == "complete":
                conn.finish()
            elif kind == "error":
                raise RuntimeError(f"GraphQL errors: {msg.get('payload')}")
            elif kind == "ping":
                send(conn, {"type": "pong"})
            elif kind == "handshake":
                send(conn, {"type": "connection_init", "payload": self.init})
            elif kind == "connection_ack":
                send(conn, {"id": op_id, "type": "subscribe", "payload": {"query": query, "variables": variables or {}}})
            else:
                raise RuntimeError(f"unexpected message: {msg}")

        ws = ClientProtocol(uri, subprotocols=[Subprotocol(PROTOCOL)], max_size=1 << 24)
        _, conn = await asyncio.get_running_loop().create_connection(lambda: _Connection(ws, on_message),
                                                                       uri.host, uri.port)
        try:
            await conn.done
        finally:
            conn.close()
