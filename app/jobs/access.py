"""Access: who is calling (API keys) and where they stand against their limits."""

from __future__ import annotations

from dataclasses import dataclass

from .domain import Caller
from .keys import KeyStore
from .queue import JobQueue
from .quotas import QuotaStore


@dataclass(frozen=True)
class Allowance:
    """One limit of a key in the current window: its size, what is left, when it frees up."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class Standing:
    """A caller, its limits and where it stands against them now."""

    caller: Caller
    requests: Allowance | None   # None: no limit (or auth off)
    tokens: Allowance | None
    active_jobs: int             # generations queued or running now


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

    async def standing(self, caller: Caller) -> Standing:
        """The caller's limits and current usage, for `viewer` (reading it costs no request)."""
        state = await self._quotas.state(caller) or {}

        def allowance(name: str) -> Allowance | None:
            a = state.get(name)
            return Allowance(a["limit"], a["remaining"], a["resetMs"]) if a else None

        return Standing(caller, allowance("requests"), allowance("tokens"), await self._queue.active(caller.owner))
