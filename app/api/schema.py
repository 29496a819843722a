"""Query, Mutation and Subscription: translate GraphQL <-> JobService calls, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.extensions import DisableIntrospection
from strawberry.types import Info

from app.inference.types import SamplingParams
from app.jobs.domain import ChatMessage, GenerationSpec
from app.jobs.domain import JobOptions as JobOptionsData
from app.jobs.domain import ReviewVerdict as ReviewVerdictData
from app.jobs.review import Reviews
from app.jobs.service import JobService
from app.settings import Settings

from .auth import admitted, subscription_slot
from .errors import ErrorCodes
from .limits import DocumentLimitSettings, document_limits
from .types import (
    Batch,
    ClassificationInput,
    ClassificationResult,
    GenerationEvent,
    GenerationInput,
    Job,
    JobConnection,
    JobOptions,
    JobStatus,
    ModelInfo,
    ReviewVerdict,
    UsageReport,
    event_of,
)

# Cancellations started when a subscriber vanishes; kept so they are not garbage-collected.
_background: set[asyncio.Task] = set()


def _jobs(info: Info) -> JobService:
    return info.context["jobs"]


def _reviews(info: Info) -> Reviews:
    return info.context["reviews"]


_caller = admitted  # the caller of a root field, counted against its quota


def _spec(inp: GenerationInput) -> GenerationSpec:
    return GenerationSpec(
        prompt=inp.prompt,
        messages=tuple(ChatMessage(m.role.value, m.content) for m in inp.messages) if inp.messages is not None else None,
        sampling=SamplingParams(
            max_tokens=inp.max_tokens,
            temperature=inp.temperature,
            top_p=inp.top_p,
            seed=inp.seed,
            stop=tuple(inp.stop or ()),
            alternatives=inp.alternatives,
        ),
        raw=inp.raw,
    )


def _options(opts: JobOptions | None) -> JobOptionsData:
    if opts is None:
        return JobOptionsData()
    return JobOptionsData(
        priority=opts.priority,
        idempotency_key=opts.idempotency_key,
        webhook_url=opts.webhook_url,
        deadline_seconds=opts.deadline_seconds,
    )


@strawberry.type
class Query:
    @strawberry.field(description="The models this server serves.")
    async def models(self, info: Info) -> list[ModelInfo]:
        await _caller(info)
        return [ModelInfo.of(info.context["model"])]

    @strawberry.field(description="A job by id; null when it does not exist.")
    async def job(self, info: Info, id: strawberry.ID) -> Job | None:
        job = await _jobs(info).get(str(id), await _caller(info))
        return Job.of(job) if job else None

    @strawberry.field(description="Jobs, newest first, optionally of one status; cursor-paginated.")
    async def jobs(self, info: Info, status: JobStatus | None = None, first: int = 20,
                   after: str | None = None) -> JobConnection:
        caller = await _caller(info)
        return JobConnection.of(await _jobs(info).list_jobs(caller, status=status, first=first, after=after))

    @strawberry.field(description="A batch by id; null when it does not exist.")
    async def batch(self, info: Info, id: strawberry.ID) -> Batch | None:
        batch = await _jobs(info).batch(str(id), await _caller(info))
        return Batch.of(batch) if batch else None

    @strawberry.field(description="Your usage in [from, to), per model version; an admin key sees every key.")
    async def usage(
        self, info: Info, from_: Annotated[datetime, strawberry.argument(name="from")], to: datetime
    ) -> list[UsageReport]:
        caller = await _caller(info)
        return [
            UsageReport(key_id=u.owner, key_name=name, model_version=u.model_version, requests=u.requests,
                        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        total_tokens=u.prompt_tokens + u.completion_tokens)
            for u, name in await _reviews(info).usage(caller, from_, to)
        ]

    @strawberry.field(description="Succeeded jobs flagged needsReview that no one has reviewed yet, newest first.")
    async def review_queue(self, info: Info, first: int = 20, after: str | None = None) -> JobConnection:
        caller = await _caller(info)
        return JobConnection.of(await _reviews(info).review_queue(caller, first=first, after=after))


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue a generation and return its job at once.")
    async def submit_generation(self, info: Info, input: GenerationInput, options: JobOptions | None = None) -> Job:
        job = await _jobs(info).submit(_spec(input), _options(options), await _caller(info))
        return Job.of(job)

    @strawberry.mutation(description="Cancel a job. A finished job is returned unchanged.")
    async def cancel_job(self, info: Info, id: strawberry.ID) -> Job:
        return Job.of(await _jobs(info).cancel(str(id), await _caller(info)))

    @strawberry.mutation(
        description="Queue many generations at once. One invalid input refuses the whole batch (its index is named)."
    )
    async def submit_batch(self, info: Info, inputs: list[GenerationInput], options: JobOptions | None = None) -> Batch:
        caller = await _caller(info)
        return Batch.of(await _jobs(info).submit_batch([_spec(i) for i in inputs], _options(options), caller))

    @strawberry.mutation(description="Cancel every job of a batch that has not finished.")
    async def cancel_batch(self, info: Info, id: strawberry.ID) -> Batch:
        return Batch.of(await _jobs(info).cancel_batch(str(id), await _caller(info)))

    @strawberry.mutation(description="Record a person's verdict on a job's answer; it leaves the review queue.")
    async def submit_review(self, info: Info, job_id: strawberry.ID, verdict: ReviewVerdict,
                            corrected_text: str | None = None) -> Job:
        caller = await _caller(info)
        return Job.of(await _reviews(info).submit_review(str(job_id), ReviewVerdictData(verdict.value),
                                                         corrected_text, caller))

    @strawberry.mutation(description="Score each label as the model's answer to the text; synchronous.")
    async def classify(self, info: Info, input: ClassificationInput) -> ClassificationResult:
        caller = await _caller(info)
        result = await info.context["classifier"].classify(input.text, list(input.labels), input.instruction, caller)
        return ClassificationResult.of(result)


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="Run a generation and stream its events. Leaving early cancels it (CANCELLED, partial result)."
    )
    async def generate(
        self, info: Info, input: GenerationInput, options: JobOptions | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        service, caller = _jobs(info), await _caller(info)
        finished = False
        async with subscription_slot(info):
            job = await service.submit(_spec(input), _options(options), caller)
            try:
                async for event in await service.events(job.id, 0, caller):
                    yield event_of(event)
                finished = True
            finally:
                if not finished:  # the client completed, unsubscribed or dropped the socket
                    task = asyncio.get_running_loop().create_task(service.cancel(job.id, caller))
                    _background.add(task)
                    task.add_done_callback(_background.discard)

    @strawberry.subscription(description="Replay a job's events with seq > after, then follow it live to the end.")
    async def job_events(self, info: Info, id: strawberry.ID, after: int = 0) -> AsyncGenerator[GenerationEvent, None]:
        caller = await _caller(info)
        async with subscription_slot(info):
            async for event in await _jobs(info).events(str(id), after, caller):
                yield event_of(event)


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    settings = settings or Settings()
    production = settings.env == "production"
    extensions = [
        (lambda: ErrorCodes(hide_suggestions=True)) if production else ErrorCodes,
        *document_limits(DocumentLimitSettings(
            max_depth=settings.max_query_depth, max_aliases=settings.max_aliases, max_tokens=settings.max_query_tokens,
            max_directives=settings.max_directives, max_cost=settings.max_query_cost,
        )),
    ]
    if not settings.introspection_enabled:
        extensions.append(DisableIntrospection)
    return strawberry.Schema(query=Query, mutation=Mutation, subscription=Subscription, extensions=extensions)


schema = build_schema(Settings(_env_file=None, env="development"))
