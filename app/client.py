"""A small InferQL client: GraphQL over HTTP and subscriptions over both websocket protocols.

Not used by the server; the tests, the benchmark and scripts use it, and it shows a
client author the wire protocol in a page.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import websockets

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"

# Called with each message a subscription sends on its websocket (connection_init, subscribe /
# start, pong, complete / stop), as a dict, just before it goes out. The benchmark uses it to
# time TTFT from the subscribe message; a hook that raises aborts the subscription.
SendHook = Callable[[dict[str, Any]], None]


class GraphQLErrors(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e.get('extensions', {}).get('code')}: {e.get('message')}" for e in errors))
        self.errors = errors

    @property
    def codes(self) -> list[str | None]:
        return [e.get("extensions", {}).get("code") for e in self.errors]


class InferQLClient:
    def __init__(self, base_url: str, api_key: str | None = None, headers: dict[str, str] | None = None,
                 timeout: float = 60.0, on_send: SendHook | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http_url = self.base_url + "/graphql"
        self.ws_url = self.http_url.replace("http", "ws", 1)
        self.api_key = api_key
        self.headers = {**({"Authorization": f"Bearer {api_key}"} if api_key else {}), **(headers or {})}
        self.last_ack: dict[str, Any] | None = None  # the latest connection_ack payload
        self.on_send = on_send  # the default send hook of subscribe(); see SendHook
        self._http = httpx.AsyncClient(timeout=timeout, headers=self.headers)
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> InferQLClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def execute_raw(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole response body: {"data": ..., "errors": [...]}."""
        resp = await self._http.post(self.http_url, json={"query": query, "variables": variables or {}})
        return resp.json()

    async def execute(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = await self.execute_raw(query, variables)
        if body.get("errors"):
            raise GraphQLErrors(body["errors"])
        return body["data"]

    async def subscribe(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        protocol: str = TRANSPORT_WS,
        init_payload: dict[str, Any] | None = None,
        on_send: SendHook | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yields each result's `data`; raises GraphQLErrors on an error result.

        Leaving the loop early sends `complete` / `stop` and closes the socket. `on_send`
        (default: the client's) sees every message just before it is sent; see SendHook.
        """
        hook = on_send or self.on_send

        async def send(ws, message: dict[str, Any]) -> None:
            text = json.dumps(message)
            if hook is not None:
                hook(message)
            await ws.send(text)

        async with websockets.connect(self.ws_url, subprotocols=[protocol], max_size=1 << 24) as ws:
            if init_payload is None and self.api_key:
                init_payload = {"Authorization": f"Bearer {self.api_key}"}
            await send(ws, {"type": "connection_init", "payload": init_payload or {}})
            ack = json.loads(await ws.recv())
            if ack.get("type") != "connection_ack":
                raise ConnectionError(f"no connection_ack: {ack}")
            self.last_ack = ack.get("payload")
            op_id = str(next(self._ids))
            start = "subscribe" if protocol == TRANSPORT_WS else "start"
            await send(ws, {"id": op_id, "type": start, "payload": {"query": query, "variables": variables or {}}})
            done = False
            try:
                while True:
                    msg = json.loads(await ws.recv())
                    kind = msg.get("type")
                    if kind in ("ping", "ka"):
                        if kind == "ping":
                            await send(ws, {"type": "pong"})
                        continue
                    if kind == "complete":
                        done = True
                        return
                    if kind == "error":
                        done = True
                        payload = msg.get("payload")
                        raise GraphQLErrors(payload if isinstance(payload, list) else [payload])
                    if kind in ("next", "data"):
                        payload = msg["payload"]
                        if payload.get("errors"):
                            raise GraphQLErrors(payload["errors"])
                        yield payload["data"]
            finally:
                if not done:
                    stop = "complete" if protocol == TRANSPORT_WS else "stop"
                    try:
                        await send(ws, {"id": op_id, "type": stop})
                    except websockets.ConnectionClosed:
                        pass
