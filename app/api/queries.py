"""The Query root: reads, translated to job-layer calls."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

from .auth import admitted
from .context import Info
from .types.batch import Batch
from .types.common import ARG_AFTER, ARG_FIRST, ARG_ID, ARG_STATUS, JobStatus, ModelInfo, UsageReport
from .types.job import Job, JobConnection, selects_result
from .types.viewer import Viewer


@strawberry.type(description="Reads.")
class Query:
    @strawberry.field(description="The API key making this request: its name, limits and current usage.")
    async def viewer(self, info: Info) -> Viewer:
        caller = await admitted(info)
        return Viewer.of(await info.context.access.standing(caller))

    @strawberry.field(description="The models this server serves.")
    async def models(self, info: Info) -> list[ModelInfo]:
        await admitted(info)
        return [ModelInfo.of(info.context.model)]

    @strawberry.field(description="A job by id; null when it does not exist.")
    async def job(self, info: Info, id: Annotated[strawberry.ID, ARG_ID]) -> Job | None:
        job = await info.context.jobs.get(str(id), await admitted(info))
        return Job.of(job) if job else None

    @strawberry.field(description="Jobs, newest first, optionally of one status; cursor-paginated.")
    async def jobs(self, info: Info, status: Annotated[JobStatus | None, ARG_STATUS] = None,
                   first: Annotated[int, ARG_FIRST] = 20, after: Annotated[str | None, ARG_AFTER] = None
                   ) -> JobConnection:
        caller = await admitted(info)
        return JobConnection.of(await info.context.jobs.list_jobs(
            caller, status=status, first=first, after=after, with_results=selects_result(info)))

    @strawberry.field(description="A batch by id; null when it does not exist.")
    async def batch(self, info: Info, id: Annotated[strawberry.ID, ARG_ID]) -> Batch | None:
        batch = await info.context.batches.get(str(id), await admitted(info))
        return Batch.of(batch) if batch else None

    @strawberry.field(description="Your usage in [from, to), per model version; an admin key sees every key.")
    async def usage(
        self, info: Info,
        from_: Annotated[datetime, strawberry.argument(name="from", description="Start of the period (included).")],
        to: Annotated[datetime, strawberry.argument(description="End of the period (excluded).")],
    ) -> list[UsageReport]:
        caller = await admitted(info)
        return [
            UsageReport(key_id=u.owner, key_name=name, model_version=u.model_version, requests=u.requests,
                        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        total_tokens=u.prompt_tokens + u.completion_tokens)
            for u, name in await info.context.reviews.usage(caller, from_, to)
        ]

    @strawberry.field(description="Succeeded jobs flagged needsReview that no one has reviewed yet, newest first.")
    async def review_queue(self, info: Info, first: Annotated[int, ARG_FIRST] = 20,
                           after: Annotated[str | None, ARG_AFTER] = None) -> JobConnection:
        caller = await admitted(info)
        return JobConnection.of(await info.context.reviews.review_queue(caller, first=first, after=after))
