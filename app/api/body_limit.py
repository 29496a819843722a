"""Transport size limits, as ASGI middleware: HTTP request bodies (413) and websocket
messages (close 1009), whichever way the app is started."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """ASGI middleware: answers 413 to an HTTP request body over `max_bytes`, even when chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def guarded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"errors": [{
            "message": f"request body is over {self.max_bytes} bytes",
            "extensions": {"code": "BAD_USER_INPUT", "limit": "bodyBytes"},
        }]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class WebSocketMessageLimit:
    """ASGI middleware: closes a websocket with 1009 (message too big) when a message from
    the client is over `max_bytes`, however the server was started (uvicorn's own
    `ws_max_size` is only set by `inferql serve`). The app then sees a disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        closed = False

        async def guarded_receive() -> Message:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.receive" and self._too_big(message):
                if not closed:
                    closed = True
                    await send({"type": "websocket.close", "code": 1009,
                                "reason": f"message over {self.max_bytes} bytes"})
                return {"type": "websocket.disconnect", "code": 1009}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal closed
            if closed:  # the app has not seen the disconnect yet: what it sends goes nowhere
                return
            closed = message["type"] == "websocket.close"
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)

    def _too_big(self, message: Message) -> bool:
        data = message.get("bytes")
        if data is not None:
            return len(data) > self.max_bytes
        text = message.get("text") or ""
        # A character is 1 to 4 bytes in UTF-8: encode only when the length alone cannot tell.
        if len(text) > self.max_bytes or len(text) * 4 <= self.max_bytes:
            return len(text) > self.max_bytes
        return len(text.encode("utf-8", "surrogatepass")) > self.max_bytes
