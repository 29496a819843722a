"""A job, its pages, its review and its webhook deliveries."""

from __future__ import annotations

from datetime import datetime

import strawberry
from strawberry.types.nodes import SelectedField

from app.jobs.domain import DeliveryOutcome as DeliveryOutcomeData
from app.jobs.domain import Job as JobData
from app.jobs.domain import Page as PageData
from app.jobs.domain import ReviewVerdict as ReviewVerdictData
from app.jobs.domain import WebhookAttempt

from ..context import Info
from .common import JobStatus, PageInfo
from .events import GenerationResult, JobError

ReviewVerdict = strawberry.enum(ReviewVerdictData, name="ReviewVerdict")


@strawberry.type(description="A person's verdict on a low-confidence answer.")
class Review:
    verdict: ReviewVerdict
    reviewer: str | None
    at: datetime
    corrected_text: str | None


WebhookOutcome = strawberry.enum(
    DeliveryOutcomeData, name="WebhookOutcome",
    description="How a webhook attempt ended. HTTP_2XX is delivered; after any other outcome the "
                "message is tried again while retries remain.",
)


@strawberry.type(description="One attempt to deliver a job's or batch's webhook.")
class WebhookDelivery:
    attempt: int
    at: datetime
    outcome: WebhookOutcome | None = strawberry.field(description="How the attempt ended.")
    http_status: int | None = strawberry.field(description="The receiver's status code, when it answered.")
    error: str | None = strawberry.field(
        description="A short fixed text for the outcome, such as `HTTP 500` or `timed out`; null when delivered.")
    next_retry_at: datetime | None = strawberry.field(description="When it is tried again; null when it is not.")

    @classmethod
    def of(cls, d: WebhookAttempt) -> WebhookDelivery:
        return cls(attempt=d.attempt, at=d.at, outcome=d.outcome, http_status=d.http_status, error=d.error,
                   next_retry_at=d.next_retry_at)


async def deliveries(info: Info, subject_id: str) -> list[WebhookDelivery]:
    return [WebhookDelivery.of(d) for d in await info.context.reviews.webhook_deliveries(subject_id)]


@strawberry.type(description="A generation: poll it, follow its events, or cancel it.")
class Job:
    id: strawberry.ID
    status: JobStatus
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = strawberry.field(description="0 = next to start; null unless QUEUED.")
    result: GenerationResult | None
    error: JobError | None
    batch_id: strawberry.ID | None
    review: Review | None
    attempts: int = strawberry.field(description="Times a worker started it (more than 1 after a crash).")

    @strawberry.field(description="Every attempt to call this job's webhookUrl, oldest first.")
    async def webhook_deliveries(self, info: Info) -> list[WebhookDelivery]:
        return await deliveries(info, str(self.id))

    @classmethod
    def of(cls, j: JobData) -> Job:
        r = j.review
        return cls(
            id=strawberry.ID(j.id),
            status=j.status,
            priority=j.priority,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            queue_position=j.queue_position,
            result=GenerationResult.of(j.id, j.result) if j.result else None,
            error=JobError.of(j.error) if j.error else None,
            batch_id=strawberry.ID(j.batch_id) if j.batch_id else None,
            review=Review(verdict=r.verdict, reviewer=r.reviewer, at=r.at, corrected_text=r.corrected_text)
            if r else None,
            attempts=j.attempts,
        )


@strawberry.type
class JobEdge:
    cursor: str
    node: Job


@strawberry.type(description="A page of jobs, newest first. Pass `pageInfo.endCursor` as `after` for the next.")
class JobConnection:
    edges: list[JobEdge]
    page_info: PageInfo

    @strawberry.field
    def nodes(self) -> list[Job]:
        return [e.node for e in self.edges]

    @classmethod
    def of(cls, page: PageData) -> JobConnection:
        return cls(
            edges=[JobEdge(cursor=c, node=Job.of(j)) for j, c in zip(page.items, page.cursors)],
            page_info=PageInfo(has_next_page=page.has_next_page, end_cursor=page.end_cursor),
        )


def selects_result(info: Info) -> bool:
    """Whether a JobConnection field's selection reaches `result` (edges.node or nodes):
    when it does not, the page is read without parsing any stored result."""

    def reaches(selections, path: tuple[str, ...]) -> bool:
        for sel in selections:
            if not isinstance(sel, SelectedField):  # a fragment (spread or inline): look inside it
                if reaches(sel.selections, path):
                    return True
            elif sel.name == path[0] and (len(path) == 1 or reaches(sel.selections, path[1:])):
                return True
        return False

    fields = info.selected_fields
    return any(reaches(f.selections, ("edges", "node", "result")) or reaches(f.selections, ("nodes", "result"))
               for f in fields)
