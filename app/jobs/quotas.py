"""Per-key limits: requests per minute, tokens per minute, concurrent generations.

Windows are exact moving windows (a minute, unless INFERQL_RATE_WINDOW_SECONDS says
otherwise). Tokens are compute-aware: admission reserves prompt tokens + maxTokens, and
when the job ends the reservation is replaced by what it really used, so a short answer
does not burn its whole maxTokens.

The windows are kept here, in memory, rather than by the `limits` package this project
used first: its asyncio memory storage expires entries by hopping to a thread for every
key on every hit, holding that key's lock meanwhile (four thread hops per request, each
waiting for a core while the engine decodes), and it stores one entry per token of a
cost-weighted hit. A window here is a deque of (time, cost) with a running sum.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .domain import Caller
from .errors import RateLimited

__all__ = ["MemoryQuotaStore", "MovingWindow", "QuotaStore", "RateLimited"]


class QuotaStore(Protocol):
    """Per-key request and token windows, with token reservations; atomic per key."""

    async def hit_request(self, caller: Caller) -> None:
        """Counts one request; RateLimited when the caller's requests per window are spent."""

    async def charge_request(self, owner: str | None) -> None:
        """Counts one request whether it fits or not (work done and thrown away)."""

    async def reserve_tokens(self, caller: Caller, job_ids: list[str], tokens_each: list[int]) -> None:
        """Check-and-reserve tokens for jobs about to be queued, all or none; RateLimited if
        they do not fit."""

    async def settle(self, job_id: str, used_tokens: int) -> None:
        """The job ended: its reservation is replaced by what it used (0 releases it)."""

    async def state(self, caller: Caller) -> dict | None:
        """The caller's limits as clients see them in `extensions.rateLimit`."""


class MovingWindow:
    """For each key, the hits of the last `seconds` with their cost, oldest first."""

    def __init__(self, seconds: float, clock=time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._hits: dict[str, deque[tuple[float, int]]] = {}
        self._used: dict[str, int] = {}

    def _expire(self, key: str, now: float) -> deque[tuple[float, int]] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        cutoff = now - self.seconds
        while hits and hits[0][0] <= cutoff:
            self._used[key] -= hits.popleft()[1]
        if not hits:  # an idle key costs nothing
            del self._hits[key], self._used[key]
            return None
        return hits

    def used(self, key: str) -> int:
        self._expire(key, self._clock())
        return self._used.get(key, 0)

    def add(self, key: str, cost: int = 1) -> None:
        now = self._clock()
        hits = self._expire(key, now)
        if hits is None:
            hits = self._hits[key] = deque()
            self._used[key] = 0
        hits.append((now, cost))
        self._used[key] += cost

    def hit(self, key: str, limit: int, cost: int = 1) -> bool:
        """Adds the hit when it fits under limit; False (and nothing added) when not."""
        if self.used(key) + cost > limit:
            return False
        self.add(key, cost)
        return True

    def reset_in(self, key: str) -> float:
        """Seconds until the oldest hit in the window leaves it (0 when there is none)."""
        now = self._clock()
        hits = self._expire(key, now)
        return max(0.0, hits[0][0] + self.seconds - now) if hits else 0.0


@dataclass
class _Reservation:
    owner: str
    tpm: int
    tokens: int


class MemoryQuotaStore:
    """The in-process QuotaStore: exact moving windows in this process's memory."""

    def __init__(self, window_seconds: int = 60) -> None:
        self.window_seconds = window_seconds
        self._window = MovingWindow(window_seconds)
        self._reserved: dict[str, _Reservation] = {}   # job id -> its reservation
        self._reserved_by_owner: dict[str, int] = {}

    def _retry_after_ms(self, key: str) -> int:
        return max(1, math.ceil(self._window.reset_in(key) * 1000))

    async def hit_request(self, caller: Caller) -> None:
        """Counts one request; refuses it when the caller's requests-per-minute are spent."""
        if caller.rpm is None or caller.owner is None:
            return
        key = f"req:{caller.owner}"
        if not self._window.hit(key, caller.rpm):
            raise RateLimited(
                f"rate limit: {caller.rpm} requests per minute for this key",
                limit="requests", retryAfterMs=self._retry_after_ms(key),
            )

    async def charge_request(self, owner: str | None) -> None:
        """Counts one more request for owner, fitting or not: work the caller made the server
        do and then threw away (a job cancelled while queued) is not free."""
        if owner is not None:
            self._window.add(f"req:{owner}")

    async def reserve_tokens(self, caller: Caller, job_ids: list[str], tokens_each: list[int]) -> None:
        """Reserves tokens for jobs about to be queued, all or none."""
        if caller.tpm is None or caller.owner is None:
            return
        key = f"tok:{caller.owner}"
        reserved = self._reserved_by_owner.get(caller.owner, 0)
        wanted = sum(tokens_each)
        if wanted > caller.tpm:
            raise RateLimited(
                f"this request needs {wanted} tokens (prompt + maxTokens) but the key allows {caller.tpm} per "
                "minute; lower maxTokens", limit="tokens", retryAfterMs=60_000,
            )
        if caller.tpm - self._window.used(key) - reserved < wanted:
            raise RateLimited(
                f"rate limit: {caller.tpm} tokens per minute for this key (prompt + maxTokens are reserved "
                "until the job ends)", limit="tokens", retryAfterMs=self._retry_after_ms(key),
            )
        for job_id, tokens in zip(job_ids, tokens_each):
            self._reserved[job_id] = _Reservation(caller.owner, caller.tpm, tokens)
        self._reserved_by_owner[caller.owner] = reserved + wanted

    async def settle(self, job_id: str, used_tokens: int) -> None:
        """The job ended: its reservation becomes the tokens it really used."""
        res = self._reserved.pop(job_id, None)
        if res is None:
            return
        self._reserved_by_owner[res.owner] -= res.tokens
        if used_tokens > 0:
            # Fits by construction (used <= reserved); if the window moved on it fits better still.
            self._window.add(f"tok:{res.owner}", min(used_tokens, res.tpm))

    async def state(self, caller: Caller) -> dict | None:
        """The caller's limits as clients see them in `extensions.rateLimit`."""
        if caller.owner is None:
            return None
        out = {}
        for name, ns, limit, extra in (("requests", "req", caller.rpm, 0),
                                       ("tokens", "tok", caller.tpm, self._reserved_by_owner.get(caller.owner, 0))):
            if limit is None:
                continue
            key = f"{ns}:{caller.owner}"
            out[name] = {
                "limit": limit,
                "remaining": max(0, limit - self._window.used(key) - extra),
                "resetMs": math.ceil(self._window.reset_in(key) * 1000),
            }
        if caller.concurrency is not None:
            out["concurrency"] = {"limit": caller.concurrency}
        return out
