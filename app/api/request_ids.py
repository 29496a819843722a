"""Request ids: every log line written while an HTTP request or a websocket connection is
handled carries one (app/logs.py). It is the client's `X-Request-ID` when that is a short
plain token, otherwise a fresh one; an HTTP answer echoes it in `X-Request-ID`."""

from __future__ import annotations

from app.logs import JOB_ID, REQUEST_ID, new_request_id


class RequestIds:
    """Pure ASGI middleware, so the id covers the whole exchange, the server's access log
    line included."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        offered = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        request_id = new_request_id(offered)
        tokens = REQUEST_ID.set(request_id), JOB_ID.set(None)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        finally:
            REQUEST_ID.reset(tokens[0])
            JOB_ID.reset(tokens[1])
