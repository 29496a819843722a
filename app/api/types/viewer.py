"""The calling API key: its name, its limits and its current usage."""

from __future__ import annotations

import strawberry

from app.jobs.access import Allowance as AllowanceData
from app.jobs.access import Standing


@strawberry.type(description="One limit in the current moving window.")
class Allowance:
    limit: int = strawberry.field(description="The most allowed per window.")
    remaining: int = strawberry.field(description="What is left now (tokens reserved by active jobs count as used).")
    reset_ms: int = strawberry.field(description="Milliseconds until the oldest use in the window expires.")

    @classmethod
    def of(cls, a: AllowanceData | None) -> Allowance | None:
        return cls(limit=a.limit, remaining=a.remaining, reset_ms=a.reset_ms) if a else None


@strawberry.type(description="The key's limits; null means unlimited.")
class ViewerLimits:
    requests_per_minute: int | None = strawberry.field(description="Root fields per window (rpm).")
    tokens_per_minute: int | None = strawberry.field(description="Prompt + completion tokens per window (tpm).")
    concurrency: int | None = strawberry.field(description="Generations queued or running at once.")
    max_priority: int | None = strawberry.field(description="The highest job priority it may ask for.")


@strawberry.type(description="What the key is using now.")
class ViewerUsage:
    requests: Allowance | None = strawberry.field(description="Requests in the current window; null if unlimited.")
    tokens: Allowance | None = strawberry.field(description="Tokens in the current window; null if unlimited.")
    active_jobs: int = strawberry.field(description="Its generations queued or running now.")


@strawberry.type(description="The API key making this request.")
class Viewer:
    name: str = strawberry.field(description="The key's name (`anonymous` with auth off).")
    admin: bool = strawberry.field(description="It sees every key's work and runs the review queue.")
    limits: ViewerLimits = strawberry.field(description="Its limits.")
    usage: ViewerUsage = strawberry.field(description="Where it stands against them now.")

    @classmethod
    def of(cls, s: Standing) -> Viewer:
        c = s.caller
        return cls(
            name=c.name, admin=c.admin,
            limits=ViewerLimits(requests_per_minute=c.rpm, tokens_per_minute=c.tpm, concurrency=c.concurrency,
                                max_priority=c.max_priority),
            usage=ViewerUsage(requests=Allowance.of(s.requests), tokens=Allowance.of(s.tokens),
                              active_jobs=s.active_jobs),
        )
