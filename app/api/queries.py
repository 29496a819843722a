"""The Query root: reads, translated to job-layer calls."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

from .auth import admitted
from .context import Info
from .types.batch import Batch
from .types.common import JobStatus, ModelInfo, UsageReport
from .types.job import Job, JobConnection, selects_result


@strawberry.type
class Query:
    @strawberry.field(description="The models this server serves.")
    async def models(self, info: Info) -> list[ModelInfo]:
        await admitted(info)
        return [ModelInfo.of(info.context.model)]

    @strawberry.field(description="A job by id; null when it does not exist.")
    async def job(self, info: Info, id: strawberry.ID) -> Job | None:
        job = await info.context.jobs.get(str(id), await admitted(info))
        return Job.of(job) if job else None

    @strawberry.field(description="Jobs, newest first, optionally of one status; cursor-paginated.")
    async def jobs(self, info: Info, status: JobStatus | None = None, first: int = 20,
                   after: str | None = None) -> JobConnection:
        caller = await admitted(info)
        return JobConnection.of(await info.context.jobs.list_jobs(
            caller, status=status, first=first, after=after, with_results=selects_result(info)))

    @strawberry.field(description="A batch by id; null when it does not exist.")
    async def batch(self, info: Info, id: strawberry.ID) -> Batch | None:
        batch = await info.context.batches.get(str(id), await admitted(info))
        return Batch.of(batch) if batch else None

    @strawberry.field(description="Your usage in [from, to), per model version; an admin key sees every key.")
    async def usage(
        self, info: Info, from_: Annotated[datetime, strawberry.argument(name="from")], to: datetime
    ) -> list[UsageReport]:
        caller = await admitted(info)
        return [
            UsageReport(key_id=u.owner, key_name=name, model_version=u.model_version, requests=u.requests,
                        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        total_tokens=u.prompt_tokens + u.completion_tokens)
            for u, name in await info.context.reviews.usage(caller, from_, to)
        ]

    @strawberry.field(description="Succeeded jobs flagged needsReview that no one has reviewed yet, newest first.")
    async def review_queue(self, info: Info, first: int = 20, after: str | None = None) -> JobConnection:
        caller = await admitted(info)
        return JobConnection.of(await info.context.reviews.review_queue(caller, first=first, after=after))
