"""Who is calling, and may they: API keys over HTTP and websockets, quotas per request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from app.jobs.domain import OPEN_DOOR, Caller
from app.jobs.errors import RateLimited, Unauthenticated
from app.jobs.access import Access

from .context import Info
from .metrics import SUBSCRIPTIONS_OPEN

HOW_TO = 'send "Authorization: Bearer <key>" (websockets: in the connection_init payload)'


def bearer(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_from(headers_or_payload: Mapping | None) -> str | None:
    if not isinstance(headers_or_payload, Mapping):
        return None
    for name in ("Authorization", "authorization"):
        if name in headers_or_payload:
            return bearer(headers_or_payload[name])
    return None


async def identify(access: Access, auth_on: bool, key: str | None) -> Caller | None:
    if not auth_on:
        return OPEN_DOOR
    return await access.authenticate(key)


async def admitted(info: Info) -> Caller:
    """The caller of this root field, counted against its requests per minute."""
    caller = info.context.caller
    if caller is None:
        raise Unauthenticated(f"a valid API key is required: {HOW_TO}")
    await info.context.access.admit(caller)
    return caller


@contextlib.asynccontextmanager
async def subscription_slot(info: Info) -> AsyncIterator[None]:
    """Holds one of the connection's subscription slots while a subscription is open."""
    ctx = info.context
    limit = ctx.max_subscriptions
    if limit is not None and ctx.open_subscriptions >= limit:
        raise RateLimited(f"{limit} subscriptions are already open on this connection",
                          limit="subscriptionsPerConnection", retryAfterMs=1000)
    ctx.open_subscriptions += 1
    gauge = SUBSCRIPTIONS_OPEN.labels(info.field_name)
    gauge.inc()
    try:
        yield
    finally:
        ctx.open_subscriptions -= 1
        gauge.dec()
