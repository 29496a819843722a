"""Batches: many generations submitted together."""

from __future__ import annotations

from datetime import datetime

import strawberry

from app.jobs.domain import Batch as BatchData
from app.jobs.domain import BatchStatus as BatchStatusData

from ..context import Info
from .common import JobStatus, Usage
from .job import JobConnection, WebhookDelivery, deliveries, selects_result

BatchStatus = strawberry.enum(BatchStatusData, name="BatchStatus")


@strawberry.type(description="Jobs of a batch by status.")
class BatchCounts:
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int
    total: int


@strawberry.type(description="Many generations submitted together; one webhook when all are terminal.")
class Batch:
    id: strawberry.ID
    status: BatchStatus
    size: int
    created_at: datetime
    finished_at: datetime | None
    counts: BatchCounts
    usage: Usage = strawberry.field(description="Summed over the batch's jobs so far.")

    @strawberry.field(description="The batch's jobs, newest first.")
    async def jobs(self, info: Info, status: JobStatus | None = None, first: int = 20,
                   after: str | None = None) -> JobConnection:
        page = await info.context.jobs.list_jobs(info.context.caller, batch_id=str(self.id), status=status,
                                                 first=first, after=after, with_results=selects_result(info))
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
