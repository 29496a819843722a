"""Websocket connections: how many each key and each client address may hold, closing
those whose key was revoked, and both protocols' handlers with the rules they share.

- A connection counts against its client address until its connection_init is accepted
  (`max_ws_unauthenticated_per_address`: more are refused at the handshake with 429),
  then against its key (`max_ws_per_key`: one more is closed with 4429).
- Both protocols close a connection that sends no connection_init in time with 4408
  (strawberry does this for graphql-transport-ws only).
- A sweep re-checks the key of every open connection against the database every half
  `key_cache_seconds` and closes those of a revoked key with 4403.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketState
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler

from app.jobs.domain import Caller

log = logging.getLogger("inferql.ws")

CLOSE_REVOKED = 4403
CLOSE_TOO_MANY = 4429
CLOSE_INIT_TIMEOUT = 4408


class ConnectionLimit(Exception):
    """This key holds as many websockets as it may (closes 4429, not 4403: the key is fine)."""


@dataclass(eq=False)
class Connection:
    websocket: WebSocket
    address: str | None
    key: str | None = None        # the API key it authenticated with, to check it again
    key_id: str | None = None
    handler: object | None = None  # the protocol handler, to stop its operations
    ended: bool = False

    async def end(self, code: int, reason: str) -> None:
        """Stops the connection's operations, then closes it (from the server's side)."""
        if self.ended:
            return
        self.ended = True
        stop = getattr(self.handler, "stop_operations", None)
        if stop is not None:
            with contextlib.suppress(Exception):
                await stop()
        with contextlib.suppress(Exception):
            if self.websocket.application_state != WebSocketState.DISCONNECTED:
                await self.websocket.close(code=code, reason=reason)


@dataclass
class Connections:
    max_per_key: int
    max_unauthenticated_per_address: int
    unauthenticated: dict[str, int] = field(default_factory=dict)
    by_key: dict[str, set[Connection]] = field(default_factory=dict)

    def open(self, websocket: WebSocket) -> Connection | None:
        """A new connection, not yet authenticated; None when its address holds too many."""
        address = websocket.client.host if websocket.client else "unknown"
        if self.unauthenticated.get(address, 0) >= self.max_unauthenticated_per_address:
            return None
        self.unauthenticated[address] = self.unauthenticated.get(address, 0) + 1
        return Connection(websocket, address)

    def authenticated(self, conn: Connection, caller: Caller, key: str | None) -> None:
        """Moves the connection from its address's count to its key's; raises ConnectionLimit
        when the key holds `max_per_key` already (the connection still counts as unauthenticated)."""
        if conn.key_id is not None:
            return
        if caller.key_id is not None:
            held = self.by_key.setdefault(caller.key_id, set())
            if len(held) >= self.max_per_key:
                raise ConnectionLimit(f"{self.max_per_key} websockets are open for this key already")
            held.add(conn)
            conn.key, conn.key_id = key, caller.key_id
        self._release_address(conn)

    def forget(self, conn: Connection) -> None:
        """The connection has closed."""
        if conn.key_id is not None:
            held = self.by_key.get(conn.key_id)
            if held is not None:
                held.discard(conn)
                if not held:
                    del self.by_key[conn.key_id]
        else:
            self._release_address(conn)

    def _release_address(self, conn: Connection) -> None:
        if conn.address is None:
            return
        left = self.unauthenticated.get(conn.address, 0) - 1
        if left > 0:
            self.unauthenticated[conn.address] = left
        else:
            self.unauthenticated.pop(conn.address, None)
        conn.address = None  # counted once

    async def sweep(self, authenticate: Callable[[str], Awaitable[Caller | None]]) -> int:
        """Closes (4403) every connection whose key no longer authenticates; returns how many."""
        closed = 0
        for key_id, held in list(self.by_key.items()):
            conn = next(iter(held), None)
            if conn is None or conn.key is None:
                continue
            try:
                caller = await authenticate(conn.key)
            except Exception:  # the database is away: keep the connections, try again next time
                log.warning("could not re-check the key of open websockets", exc_info=True)
                continue
            if caller is not None and caller.key_id == key_id:
                continue
            for conn in list(held):
                await conn.end(CLOSE_REVOKED, "API key revoked")
                closed += 1
        return closed

    async def sweep_forever(self, authenticate: Callable[[str], Awaitable[Caller | None]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.sweep(authenticate)


async def refuse_crowded(websocket: WebSocket, limit: int) -> None:
    """Refuses the handshake: 429 with a GraphQL-shaped body where the server can send one, else 403."""
    message = f"{limit} websockets of this address are waiting for their connection_init already"
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = {"errors": [{"message": message, "extensions": {"code": "RATE_LIMITED",
                                                               "limit": "unauthenticatedWebsocketsPerAddress"}}]}
        await websocket.send_denial_response(JSONResponse(body, status_code=429))
    else:
        await websocket.close(code=1008, reason=message[:120])


class WebSocketAdapter(ASGIWebSocketAdapter):
    """Once the server has closed a connection (a revoked key, a timeout), what its
    operations still send is dropped instead of raising."""

    async def send_json(self, message) -> None:
        ws = self.ws
        state = ws.application_state
        if state == WebSocketState.DISCONNECTED:
            raise WebSocketDisconnected
        if state != WebSocketState.CONNECTED:
            await super().send_json(message)
            return
        # What Starlette's send_text -> send does for a connected socket, without their two
        # frames per message (one message per token).
        try:
            await ws._send({"type": "websocket.send", "text": self.view.encode_json(message)})
        except OSError:
            ws.application_state = WebSocketState.DISCONNECTED
            raise WebSocketDisconnected from None

    async def close(self, code: int, reason: str) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            await super().close(code, reason)


def _register(handler) -> None:
    conn = getattr(handler.context, "connection", None)
    if conn is not None:
        conn.handler = handler


class TransportWSHandler(BaseGraphQLTransportWSHandler):
    """graphql-transport-ws: a key over its connection limit closes 4429."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _register(self)

    async def handle_connection_init(self, message) -> None:
        try:
            await super().handle_connection_init(message)
        except ConnectionLimit as exc:
            await self.websocket.close(code=CLOSE_TOO_MANY, reason=str(exc)[:120])

    async def stop_operations(self) -> None:
        for operation_id in list(self.operations):
            await self.cleanup_operation(operation_id)


class LegacyWSHandler(BaseGraphQLWSHandler):
    """graphql-ws (subscriptions-transport-ws): adds the connection_init timeout the
    protocol's strawberry handler lacks (4408), and the key's connection limit (4429)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_received = False
        _register(self)

    async def handle(self) -> None:
        timer = asyncio.create_task(self._close_without_init())
        try:
            await super().handle()
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await timer

    async def _close_without_init(self) -> None:
        await asyncio.sleep(self.view.connection_init_wait_timeout.total_seconds())
        if not self.init_received:
            await self.websocket.close(code=CLOSE_INIT_TIMEOUT, reason="Connection initialisation timeout")

    async def handle_connection_init(self, message) -> None:
        self.init_received = True
        try:
            await super().handle_connection_init(message)
        except ConnectionLimit as exc:
            await self.send_message({"type": "connection_error", "payload": {"message": str(exc)}})
            await self.websocket.close(code=CLOSE_TOO_MANY, reason=str(exc)[:120])

    async def stop_operations(self) -> None:
        await self.cleanup()
