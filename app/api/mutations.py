"""The Mutation root: writes, translated to job-layer calls."""

from __future__ import annotations

from typing import Annotated

import strawberry

from app.jobs.domain import ReviewVerdict as ReviewVerdictData

from .auth import admitted
from .context import Info
from .inputs import ClassificationInput, GenerationInput, JobOptions
from .types.batch import Batch
from .types.classification import ClassificationResult
from .types.common import ARG_ID
from .types.job import Job, ReviewVerdict


ARG_INPUT = strawberry.argument(description="What to generate.")
ARG_OPTIONS = strawberry.argument(description="Priority, idempotency key, webhook and deadline.")


@strawberry.type(description="Writes.")
class Mutation:
    @strawberry.mutation(description="Queue a generation and return its job at once.")
    async def submit_generation(self, info: Info, input: Annotated[GenerationInput, ARG_INPUT],
                                options: Annotated[JobOptions | None, ARG_OPTIONS] = None) -> Job:
        job = await info.context.jobs.submit(input.to_spec(), JobOptions.to_data(options), await admitted(info))
        return Job.of(job)

    @strawberry.mutation(description="Cancel a job. A finished job is returned unchanged.")
    async def cancel_job(self, info: Info, id: Annotated[strawberry.ID, ARG_ID]) -> Job:
        return Job.of(await info.context.jobs.cancel(str(id), await admitted(info)))

    @strawberry.mutation(
        description="Queue many generations at once. One invalid input refuses the whole batch (its index is named)."
    )
    async def submit_batch(
        self, info: Info,
        inputs: Annotated[list[GenerationInput], strawberry.argument(description="1 to 100 generations, one job each.")],
        options: Annotated[JobOptions | None, strawberry.argument(
            description="Applied to every job; the webhook fires once, when all have ended.")] = None,
    ) -> Batch:
        caller = await admitted(info)
        specs = [i.to_spec() for i in inputs]
        return Batch.of(await info.context.batches.submit(specs, JobOptions.to_data(options), caller))

    @strawberry.mutation(description="Cancel every job of a batch that has not finished.")
    async def cancel_batch(self, info: Info, id: Annotated[strawberry.ID, ARG_ID]) -> Batch:
        return Batch.of(await info.context.batches.cancel(str(id), await admitted(info)))

    @strawberry.mutation(description="Record a person's verdict on a job's answer; it leaves the review queue.")
    async def submit_review(
        self, info: Info, job_id: Annotated[strawberry.ID, strawberry.argument(description="The job reviewed.")],
        verdict: Annotated[ReviewVerdict, strawberry.argument(description="The verdict.")],
        corrected_text: Annotated[str | None, strawberry.argument(
            description="The right answer, with verdict CORRECTED.")] = None,
    ) -> Job:
        caller = await admitted(info)
        return Job.of(await info.context.reviews.submit_review(str(job_id), ReviewVerdictData(verdict.value),
                                                               corrected_text, caller))

    @strawberry.mutation(description="Score each label as the model's answer to the text; synchronous.")
    async def classify(self, info: Info, input: Annotated[ClassificationInput, strawberry.argument(
            description="The text and the labels.")]) -> ClassificationResult:
        caller = await admitted(info)
        result = await info.context.classifier.classify(input.text, list(input.labels), input.instruction, caller)
        return ClassificationResult.of(result)
