"""The Mutation root: writes, translated to job-layer calls."""

from __future__ import annotations

import strawberry

from app.jobs.domain import ReviewVerdict as ReviewVerdictData

from .auth import admitted
from .context import Info
from .inputs import ClassificationInput, GenerationInput, JobOptions
from .types.batch import Batch
from .types.classification import ClassificationResult
from .types.job import Job, ReviewVerdict


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue a generation and return its job at once.")
    async def submit_generation(self, info: Info, input: GenerationInput, options: JobOptions | None = None) -> Job:
        job = await info.context.jobs.submit(input.to_spec(), JobOptions.to_data(options), await admitted(info))
        return Job.of(job)

    @strawberry.mutation(description="Cancel a job. A finished job is returned unchanged.")
    async def cancel_job(self, info: Info, id: strawberry.ID) -> Job:
        return Job.of(await info.context.jobs.cancel(str(id), await admitted(info)))

    @strawberry.mutation(
        description="Queue many generations at once. One invalid input refuses the whole batch (its index is named)."
    )
    async def submit_batch(self, info: Info, inputs: list[GenerationInput], options: JobOptions | None = None) -> Batch:
        caller = await admitted(info)
        specs = [i.to_spec() for i in inputs]
        return Batch.of(await info.context.batches.submit(specs, JobOptions.to_data(options), caller))

    @strawberry.mutation(description="Cancel every job of a batch that has not finished.")
    async def cancel_batch(self, info: Info, id: strawberry.ID) -> Batch:
        return Batch.of(await info.context.batches.cancel(str(id), await admitted(info)))

    @strawberry.mutation(description="Record a person's verdict on a job's answer; it leaves the review queue.")
    async def submit_review(self, info: Info, job_id: strawberry.ID, verdict: ReviewVerdict,
                            corrected_text: str | None = None) -> Job:
        caller = await admitted(info)
        return Job.of(await info.context.reviews.submit_review(str(job_id), ReviewVerdictData(verdict.value),
                                                               corrected_text, caller))

    @strawberry.mutation(description="Score each label as the model's answer to the text; synchronous.")
    async def classify(self, info: Info, input: ClassificationInput) -> ClassificationResult:
        caller = await admitted(info)
        result = await info.context.classifier.classify(input.text, list(input.labels), input.instruction, caller)
        return ClassificationResult.of(result)
