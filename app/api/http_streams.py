"""Subscriptions over HTTP (GraphQL over SSE, multipart subscriptions) and the media type
a JSON answer is sent with.

A streamed subscription holds its HTTP request open for as long as a websocket would be,
so open streams count against the key like websockets do: at most `max_per_key` at once
(the `max_ws_per_key` setting); one more is refused with RATE_LIMITED (429). Each stream
is one request with one operation, so the per-connection subscription cap is 1 there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.responses import JSONResponse, Response, StreamingResponse
from strawberry.http.streaming import SSETransport


from app.jobs.domain import Caller

GRAPHQL_RESPONSE = "application/graphql-response+json"


class LineFeedSSE(SSETransport):
    """GraphQL over SSE with LF line ends. CRLF is valid SSE too, but some clients split
    events on a blank line of LFs only (urql's fetchSubscriptions never sees an event end)."""

    def encode_event(self, event: str, data: str | None = None) -> str:
        return super().encode_event(event, data).replace("\r\n", "\n")

    def encode_comment(self, comment: str) -> str:
        return super().encode_comment(comment).replace("\r\n", "\n")


def _media_ranges(accept: str) -> dict[str, float]:
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges[media.lower()] = max(q, ranges.get(media.lower(), 0.0))
    return ranges


def wants_graphql_response(accept: str | None) -> bool:
    """Whether a JSON answer goes out as application/graphql-response+json: the client accepts
    it at least as much as application/json. Without an Accept header, or with only */*, the
    answer stays application/json (what clients written before the spec expect)."""
    if not accept:
        return False
    ranges = _media_ranges(accept)
    q = ranges.get(GRAPHQL_RESPONSE, 0.0)
    return q > 0 and q >= ranges.get("application/json", 0.0)


@dataclass
class HttpStreams:
    max_per_key: int
    open: dict[str, int] = field(default_factory=dict)

    async def run(self, caller: Caller | None, call: Callable[[], Awaitable[Response]]) -> Response:
        key_id = caller.key_id if caller is not None else None
        if key_id is not None and self.open.get(key_id, 0) >= self.max_per_key:
            return JSONResponse({"errors": [{
                "message": f"{self.max_per_key} subscription streams are open for this key already",
                "extensions": {"code": "RATE_LIMITED", "limit": "streamsPerKey"},
            }]}, status_code=429)
        self._take(key_id)
        try:
            response = await call()
        except BaseException:
            self._release(key_id)
            raise
        if not isinstance(response, StreamingResponse):
            self._release(key_id)
            return response
        return _CountedStream(response, lambda: self._release(key_id))

    def _take(self, key_id: str | None) -> None:
        if key_id is not None:
            self.open[key_id] = self.open.get(key_id, 0) + 1

    def _release(self, key_id: str | None) -> None:
        if key_id is None:
            return
        left = self.open.get(key_id, 0) - 1
        if left > 0:
            self.open[key_id] = left
        else:
            self.open.pop(key_id, None)


class _CountedStream(StreamingResponse):
    """The stream as it was, and its key's slot freed once it has been sent or abandoned
    (a client that leaves before the first event included)."""

    def __init__(self, inner: StreamingResponse, release: Callable[[], None]) -> None:
        self.__dict__.update(inner.__dict__)
        self._release_slot = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release_slot = self._release_slot, None
            if release is not None:
                release()
