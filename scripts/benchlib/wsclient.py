"""A lean graphql-transport-ws client: the streaming phases' load generator.

On a 2-core machine whose cores the engine keeps busy, the client's CPU per token competes
with the server it measures, and the direct phase has no such client. This one keeps
`websockets`' sans-I/O protocol for the handshake and the framing and drops the rest of its
asyncio connection (a reader task, a frame assembler, a queue hop per message): an
asyncio.Protocol feeds received bytes to it and each message is handled in data_received,
by a callback, with no task woken per message. A socket whose subscription ended is kept for
the next one, as browser clients keep theirs: a bench worker running generations one after
another connects once per phase (before, at 1 stream, 3 of a phase's 4 generations waited
~24 ms each for a new connect + connection_init inside the phase's time, where the direct
engine waits for nothing).

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
    """One websocket: the handshake and connection_init once, then subscriptions one at a time
    (graphql-transport-ws runs any number over one socket, as browser clients do). Each message
    of the current one goes to its handler as it arrives; `acked` settles at connection_ack."""

    def __init__(self, ws: ClientProtocol, init: dict, send_hook: Callable[[dict], None] | None) -> None:
        self.ws = ws
        self.init = init
        self.send_hook = send_hook  # the opening subscription's, for its connection_init
        self.transport: asyncio.Transport | None = None
        self.acked: asyncio.Future = asyncio.get_running_loop().create_future()
        self.op: _Operation | None = None
        self.broken = False  # lost, failed or closed: not to be used again

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws.send_request(self.ws.connect())
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if self.broken:
                break
            try:
                if isinstance(event, Frame):
                    if event.opcode is Opcode.TEXT:
                        self.dispatch(json.loads(event.data))
                elif isinstance(event, Response):
                    if self.ws.handshake_exc is not None:
                        raise self.ws.handshake_exc
                    self.send({"type": "connection_init", "payload": self.init}, self.send_hook)
            except Exception as exc:
                self.fail(exc)
        self.flush()  # pongs, close frames

    def dispatch(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ping":
            self.send({"type": "pong"})
        elif kind == "connection_ack":
            if not self.acked.done():
                self.acked.set_result(None)
        elif kind in ("next", "complete", "error") and self.op is not None and msg.get("id") == self.op.id:
            self.op.handle(msg)
        else:
            raise RuntimeError(f"unexpected message: {msg}")

    def connection_lost(self, exc) -> None:
        self.fail(ConnectionError("the server closed the connection"))

    def fail(self, error: BaseException) -> None:
        self.broken = True
        if not self.acked.done():
            self.acked.set_exception(error)
        if self.op is not None:
            self.op.finish(error)

    def flush(self) -> None:
        data = self.ws.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(data))

    def send(self, message: dict, hook: Callable[[dict], None] | None = None) -> None:
        if hook is not None:
            hook(message)
        self.ws.send_text(json.dumps(message).encode())
        self.flush()

    def close(self) -> None:
        self.broken = True
        if self.transport is not None and not self.transport.is_closing():
            self.ws.send_close()
            self.flush()
            self.transport.close()


class _Operation:
    """One subscription on a connection: `done` settles with its end (complete, an error)."""

    def __init__(self, op_id: str, on_data: Callable[[dict], None]) -> None:
        self.id = op_id
        self.on_data = on_data
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def handle(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "next":
            if msg["payload"].get("errors"):
                raise RuntimeError(f"GraphQL errors: {msg['payload']['errors']}")
            self.on_data(msg["payload"]["data"])
        elif kind == "complete":
            self.finish()
        else:
            raise RuntimeError(f"GraphQL errors: {msg.get('payload')}")

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class LeanSubscriptions:
    """graphql-transport-ws subscriptions: `run` calls `on_data` with each result's `data` and
    returns at its `complete`; an error result raises. A connection whose subscription ended
    cleanly waits for the next `run` (as a browser's client keeps its socket), so a worker running
    subscriptions one after another connects once; `close_idle` closes the idle ones."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.ws_url = base_url.replace("http", "ws", 1) + "/graphql"
        self.init = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._ids = itertools.count(1)
        self._idle: list[_Connection] = []

    async def run(self, query: str, variables: dict | None, *, on_data: Callable[[dict], None],
                  on_send: Callable[[dict], None] | None = None) -> None:
        self._idle = [c for c in self._idle if not c.broken]  # the server may have closed some
        conn = self._idle.pop() if self._idle else await self._open(on_send)
        op = conn.op = _Operation(str(next(self._ids)), on_data)
        try:
            conn.send({"id": op.id, "type": "subscribe", "payload": {"query": query, "variables": variables or {}}},
                      on_send)
            await op.done
        except BaseException:
            conn.close()
            raise
        conn.op = None
        if not conn.broken:
            self._idle.append(conn)

    async def _open(self, on_send: Callable[[dict], None] | None) -> _Connection:
        uri = parse_uri(self.ws_url)
        ws = ClientProtocol(uri, subprotocols=[Subprotocol(PROTOCOL)], max_size=1 << 24)
        _, conn = await asyncio.get_running_loop().create_connection(lambda: _Connection(ws, self.init, on_send),
                                                                       uri.host, uri.port)
        try:
            await conn.acked
        except BaseException:
            conn.close()
            raise
        conn.send_hook = None
        return conn

    async def close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()
