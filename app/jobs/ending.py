"""What follows from a job's end: the rules, decided here and written by the store in one
transaction with the end itself (so a crash never leaves an ended job whose webhook or
bill is lost)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .domain import Batch, GenerationResult, Job, JobError, JobStatus, Usage
from .persistence.tables import WebhookRow
from .webhook_messages import batch_message, job_message


@dataclass(frozen=True)
class Ending:
    status: JobStatus
    finished_at: datetime
    result: GenerationResult | None = None
    error: JobError | None = None

    @property
    def needs_review(self) -> bool:
        """Only a succeeded answer goes to the review queue, when its confidence is low."""
        return self.status is JobStatus.SUCCEEDED and self.result is not None and self.result.needs_review

    @property
    def bill(self) -> Usage | None:
        """The usage to record: what the job really used, when it used anything."""
        if self.result is None or not self.result.usage.total_tokens:
            return None
        return self.result.usage

    def job_webhook(self, job: Job) -> WebhookRow | None:
        """The ended job's webhook message, when it asked for one (batch jobs do not: their batch does)."""
        return job_message(job, job.webhook_url, self.finished_at) if job.webhook_url else None

    def batch_webhook(self, batch: Batch) -> WebhookRow | None:
        """The batch's message, once every job of it has ended."""
        return batch_message(batch, batch.webhook_url, self.finished_at) if batch.webhook_url else None
