"""A job, its pages, its review and its webhook deliveries."""

from __future__ import annotations

import asyncio
from datetime import datetime

import strawberry
from strawberry.types.nodes import SelectedField

from app.jobs.domain import DeliveryOutcome as DeliveryOutcomeData
from app.jobs.domain import GenerationSpec
from app.jobs.domain import Job as JobData
from app.jobs.domain import Page as PageData
from app.jobs.domain import ReviewVerdict as ReviewVerdictData
from app.jobs.domain import WebhookAttempt

from ..context import Info
from ..inputs import ChatRole
from .common import JobStatus, PageInfo, described_enum
from .events import GenerationResult, JobError
from .scalars import Long

ReviewVerdict = described_enum(ReviewVerdictData, "ReviewVerdict", "A person's verdict on an answer.", {
    "APPROVED": "The answer is right.",
    "REJECTED": "The answer is wrong.",
    "CORRECTED": "The answer was wrong; correctedText holds the right one.",
})


@strawberry.type(description="A person's verdict on a low-confidence answer.")
class Review:
    verdict: ReviewVerdict = strawberry.field(description="The verdict.")
    reviewer: str | None = strawberry.field(description="The name of the key that reviewed it.")
    at: datetime = strawberry.field(description="When.")
    corrected_text: str | None = strawberry.field(description="The right answer, for CORRECTED.")


WebhookOutcome = described_enum(
    DeliveryOutcomeData, "WebhookOutcome",
    "How a webhook attempt ended. HTTP_2XX is delivered; after any other outcome the "
    "message is tried again while retries remain.",
    {
        "HTTP_2XX": "Delivered: the receiver answered 2xx.",
        "HTTP_3XX": "The receiver answered a redirect (not followed).",
        "HTTP_4XX": "The receiver answered 4xx.",
        "HTTP_5XX": "The receiver answered 5xx.",
        "TIMEOUT": "No complete answer within the attempt's deadline.",
        "CONNECTION_REFUSED": "The receiver refused the connection.",
        "CONNECTION_ERROR": "Could not connect, or the connection broke.",
        "TLS_ERROR": "The TLS handshake or the certificate check failed.",
        "DNS_ERROR": "The host name does not resolve.",
        "BLOCKED_DESTINATION": "The host is not a public address.",
        "PROTOCOL_ERROR": "The answer was not valid HTTP.",
        "INVALID_URL": "The URL cannot be called.",
        "INTERNAL_ERROR": "The attempt failed on the server's side.",
    },
)


@strawberry.type(description="One attempt to deliver a job's or batch's webhook.")
class WebhookDelivery:
    attempt: int = strawberry.field(description="1 for the first attempt, then 2, 3 ...")
    at: datetime = strawberry.field(description="When it was made.")
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


@strawberry.type(description="A chat message as it was sent.")
class ChatMessage:
    role: ChatRole = strawberry.field(description="Who speaks.")
    content: str = strawberry.field(description="What they say.")


@strawberry.type(description="What a job was asked: its GenerationInput as stored (defaults filled in).")
class JobInput:
    prompt: str | None = strawberry.field(description="The prompt; null when `messages` was sent.")
    messages: list[ChatMessage] | None = strawberry.field(description="The chat; null when `prompt` was sent.")
    raw: bool = strawberry.field(description="The prompt was fed verbatim, without the chat template.")
    max_tokens: int = strawberry.field(description="The most tokens it may generate.")
    temperature: float = strawberry.field(description="0 = greedy.")
    top_p: float = strawberry.field(description="Nucleus sampling threshold; 1 = every token.")
    seed: Long | None = strawberry.field(description="The seed, when one was given (a Long: a decimal string).")
    stop: list[str] = strawberry.field(description="The stop strings (empty when none).")
    alternatives: int = strawberry.field(description="Alternatives reported per token.")

    @classmethod
    def of(cls, spec: GenerationSpec) -> JobInput:
        s = spec.sampling
        return cls(
            prompt=spec.prompt,
            messages=[ChatMessage(role=ChatRole(m.role), content=m.content) for m in spec.messages]
            if spec.messages is not None else None,
            raw=spec.raw, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
            stop=list(s.stop), alternatives=s.alternatives,
        )


@strawberry.type(description="How far a job has come: tokens generated against maxTokens.")
class JobProgress:
    tokens: int = strawberry.field(description="Tokens generated so far (the final count once it ended).")
    max_tokens: int = strawberry.field(description="The job's maxTokens.")
    fraction: float = strawberry.field(
        description="tokens / maxTokens, in [0, 1]. The model may stop before maxTokens, so a finished job can "
                    "stay below 1: use `status` to know it ended.")


@strawberry.type(description="A generation: poll it, follow its events, or cancel it.")
class Job:
    id: strawberry.ID = strawberry.field(description="The job's id (a UUID).")
    status: JobStatus = strawberry.field(description="Where it is in its lifecycle.")
    priority: int = strawberry.field(description="Higher runs first (-100 to 100).")
    created_at: datetime = strawberry.field(description="When it was accepted.")
    started_at: datetime | None = strawberry.field(description="When the model started on it; null before.")
    finished_at: datetime | None = strawberry.field(description="When it ended; null while active.")
    queue_position: int | None = strawberry.field(description="0 = next to start; null unless QUEUED.")
    result: GenerationResult | None = strawberry.field(
        description="The answer once it ended with one (SUCCEEDED, or the partial one of CANCELLED/EXPIRED); "
                    "null while active (see partialText and progress).")
    error: JobError | None = strawberry.field(description="Why it FAILED; null otherwise.")
    batch_id: strawberry.ID | None = strawberry.field(description="The batch it belongs to, if any.")
    batch_index: int | None = strawberry.field(
        description="Its place among its batch's inputs (0-based); null outside a batch.")
    review: Review | None = strawberry.field(description="A person's verdict on its answer, once reviewed.")
    attempts: int = strawberry.field(description="Times a worker started it (more than 1 after a crash).")
    input: JobInput = strawberry.field(description="What was asked: the prompt or messages and the sampling.")
    data: strawberry.Private[JobData]

    @strawberry.field(
        description="The text generated so far: while RUNNING from its live event log, once ended its result's "
                    "text; empty while QUEUED.")
    async def partial_text(self, info: Info) -> str:
        return (await self._progress(info)).text

    @strawberry.field(description="Tokens generated so far against maxTokens.")
    async def progress(self, info: Info) -> JobProgress:
        p = await self._progress(info)
        return JobProgress(tokens=p.tokens, max_tokens=p.max_tokens,
                           fraction=min(1.0, p.tokens / p.max_tokens) if p.max_tokens else 0.0)

    @strawberry.field(description="Every attempt to call this job's webhookUrl, oldest first.")
    async def webhook_deliveries(self, info: Info) -> list[WebhookDelivery]:
        return await deliveries(info, str(self.id))

    def _progress(self, info: Info) -> asyncio.Future:
        """Read once per Job object, whether partialText, progress or both are asked."""
        if (future := self.__dict__.get("_progress_future")) is None:
            future = self.__dict__["_progress_future"] = asyncio.ensure_future(info.context.jobs.progress(self.data))
        return future

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
            batch_index=j.batch_index,
            input=JobInput.of(j.spec),
            data=j,
        )


@strawberry.type(description="A job in a page, with its cursor.")
class JobEdge:
    cursor: str = strawberry.field(description="Pass as `after` to continue after this job.")
    node: Job = strawberry.field(description="The job.")


@strawberry.type(description="A page of jobs, newest first. Pass `pageInfo.endCursor` as `after` for the next.")
class JobConnection:
    edges: list[JobEdge] = strawberry.field(description="The page's jobs with their cursors.")
    page_info: PageInfo = strawberry.field(description="Where the page ends.")

    @strawberry.field(description="The page's jobs (the edges' nodes).")
    def nodes(self) -> list[Job]:
        return [e.node for e in self.edges]

    @classmethod
    def of(cls, page: PageData) -> JobConnection:
        return cls(
            edges=[JobEdge(cursor=c, node=Job.of(j)) for j, c in zip(page.items, page.cursors)],
            page_info=PageInfo(has_next_page=page.has_next_page, end_cursor=page.end_cursor),
        )


def selects_result(info: Info) -> bool:
    """Whether a JobConnection field's selection reaches `result`, `partialText` or `progress` (edges.node or nodes):
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
    return any(reaches(f.selections, (*start, leaf)) for f in fields
               for start in (("edges", "node"), ("nodes",)) for leaf in ("result", "partialText", "progress"))
