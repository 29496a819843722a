"""Per-key limits: requests per minute, tokens per minute, concurrent generations.

Windows are moving windows (a minute, unless INFERQL_RATE_WINDOW_SECONDS says otherwise)
kept by the `limits` package (memory storage; its Redis storage is a drop-in for several
processes). Tokens are compute-aware: admission
reserves prompt tokens + maxTokens, and when the job ends the reservation is replaced by
what it really used, so a short answer does not burn its whole maxTokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from .domain import Caller
from .errors import ServiceError


class RateLimited(ServiceError):
    code = "RATE_LIMITED"


@dataclass
class _Reservation:
    owner: str
    tpm: int
    tokens: int


class Quotas:
    def __init__(self, window_seconds: int = 60) -> None:
        self.window_seconds = window_seconds
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._reserved: dict[str, _Reservation] = {}   # job id -> its reservation
        self._reserved_by_owner: dict[str, int] = {}

    def _item(self, amount: int) -> RateLimitItemPerSecond:
        """`amount` per window (a minute, unless configured otherwise)."""
        return RateLimitItemPerSecond(amount, self.window_seconds)

    async def _retry_after_ms(self, item, *ids: str) -> int:
        stats = await self._limiter.get_window_stats(item, *ids)
        return max(1, math.ceil((stats.reset_time - time.time()) * 1000))

    async def hit_request(self, caller: Caller) -> None:
        """Counts one request; refuses it when the caller's requests-per-minute are spent."""
        if caller.rpm is None or caller.owner is None:
            return
        item = self._item(caller.rpm)
        if not await self._limiter.hit(item, "req", caller.owner):
            raise RateLimited(
                f"rate limit: {caller.rpm} requests per minute for this key",
                limit="requests", retryAfterMs=await self._retry_after_ms(item, "req", caller.owner),
            )

    async def reserve_tokens(self, caller: Caller, job_ids: list[str], tokens_each: list[int]) -> None:
        """Reserves tokens for jobs about to be queued, all or none."""
        if caller.tpm is None or caller.owner is None:
            return
        item = self._item(caller.tpm)
        stats = await self._limiter.get_window_stats(item, "tok", caller.owner)
        reserved = self._reserved_by_owner.get(caller.owner, 0)
        wanted = sum(tokens_each)
        if wanted > caller.tpm:
            raise RateLimited(
                f"this request needs {wanted} tokens (prompt + maxTokens) but the key allows {caller.tpm} per "
                "minute; lower maxTokens", limit="tokens", retryAfterMs=60_000,
            )
        if stats.remaining - reserved < wanted:
            raise RateLimited(
                f"rate limit: {caller.tpm} tokens per minute for this key (prompt + maxTokens are reserved "
                "until the job ends)", limit="tokens",
                retryAfterMs=await self._retry_after_ms(item, "tok", caller.owner),
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
            await self._limiter.hit(self._item(res.tpm), "tok", res.owner,
                                    cost=min(used_tokens, res.tpm))

    async def state(self, caller: Caller) -> dict | None:
        """The caller's limits as clients see them in `extensions.rateLimit`."""
        if caller.owner is None:
            return None
        out = {}
        for name, ns, limit, extra in (("requests", "req", caller.rpm, 0),
                                       ("tokens", "tok", caller.tpm, self._reserved_by_owner.get(caller.owner, 0))):
            if limit is None:
                continue
            stats = await self._limiter.get_window_stats(self._item(limit), ns, caller.owner)
            out[name] = {
                "limit": limit,
                "remaining": max(0, stats.remaining - extra),
                "resetMs": max(0, math.ceil((stats.reset_time - time.time()) * 1000)),
            }
        if caller.concurrency is not None:
            out["concurrency"] = {"limit": caller.concurrency}
        return out
