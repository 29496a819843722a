"""Access: who is calling (API keys) and where they stand against their limits."""

from __future__ import annotations

from .domain import Caller
from .keys import KeyStore
from .queue import JobQueue
from .quotas import QuotaStore


class Access:
    def __init__(self, *, keys: KeyStore | None, quotas: QuotaStore, queue: JobQueue) -> None:
        self.keys = keys
        self._quotas = quotas
        self._queue = queue

    async def authenticate(self, key: str | None) -> Caller | None:
        """The caller behind an API key; None when the key is missing, unknown or revoked."""
        if self.keys is None or not key:
            return None
        return await self.keys.authenticate(key)

    async def admit(self, caller: Caller) -> None:
        """Counts one request against the caller's requests per window (RateLimited past it)."""
        await self._quotas.hit_request(caller)

    async def rate_state(self, caller: Caller) -> dict | None:
        """The caller's limits and what is left of them, as `extensions.rateLimit` shows them."""
        state = await self._quotas.state(caller)
        if state is not None and caller.concurrency is not None:
            state["concurrency"]["active"] = await self._queue.active(caller.owner)
        return state
