"""Batches: many generations submitted together."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

from app.jobs.domain import Batch as BatchData
from app.jobs.domain import BatchStatus as BatchStatusData

from ..context import Info
from .common import ARG_AFTER, ARG_FIRST, ARG_STATUS, JobStatus, Usage, described_enum
from .job import JobConnection, WebhookDelivery, deliveries, selects_result

BatchStatus = described_enum(BatchStatusData, "BatchStatus", "Where a batch is.", {
    "IN_PROGRESS": "Some of its jobs are still queued or running.",
    "COMPLETED": "Every job has ended.",
    "CANCELLED": "cancelBatch was called (its jobs have ended or are being stopped).",
})


@strawberry.type(description="Jobs of a batch by status.")
class BatchCounts:
    queued: int = strawberry.field(description="Jobs QUEUED.")
    running: int = strawberry.field(description="Jobs RUNNING.")
    succeeded: int = strawberry.field(description="Jobs SUCCEEDED.")
    failed: int = strawberry.field(description="Jobs FAILED.")
    cancelled: int = strawberry.field(description="Jobs CANCELLED.")
    expired: int = strawberry.field(description="Jobs EXPIRED.")
    total: int = strawberry.field(description="All its jobs.")


@strawberry.type(description="Many generations submitted together; one webhook when all are terminal.")
class Batch:
    id: strawberry.ID = strawberry.field(description="The batch's id (a UUID).")
    status: BatchStatus = strawberry.field(description="Where it is.")
    size: int = strawberry.field(description="How many inputs (jobs) it has.")
    created_at: datetime = strawberry.field(description="When it was accepted.")
    finished_at: datetime | None = strawberry.field(description="When its last job ended; null before.")
    counts: BatchCounts = strawberry.field(description="Its jobs by status.")
    usage: Usage = strawberry.field(description="Summed over the batch's jobs so far.")

    @strawberry.field(description="The batch's jobs in the order of its inputs (each with its batchIndex).")
    async def jobs(self, info: Info, status: Annotated[JobStatus | None, ARG_STATUS] = None,
                   first: Annotated[int, ARG_FIRST] = 20, after: Annotated[str | None, ARG_AFTER] = None
                   ) -> JobConnection:
        page = await info.context.jobs.list_jobs(info.context.caller, batch_id=str(self.id), status=status,
                                                 first=first, after=after, with_results=selects_result(info),
                                                 input_order=True)
        return JobConnection.of(page)

    @strawberry.field(description="Every attempt to call the batch's webhookUrl, oldest first.")
    async def webhook_deliveries(self, info: Info) -> list[WebhookDelivery]:
        return await deliveries(info, str(self.id))

    @classmethod
    def of(cls, b: BatchData) -> Batch:
        c = b.counts
        return cls(
            id=strawberry.ID(b.id), status=b.status, size=b.size, created_at=b.created_at,
            finished_at=b.finished_at,
            counts=BatchCounts(queued=c.queued, running=c.running, succeeded=c.succeeded, failed=c.failed,
                               cancelled=c.cancelled, expired=c.expired, total=c.total),
            usage=Usage.of(b.usage),
        )
