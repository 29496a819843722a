"""GraphQL types of the public contract, and their construction from service data."""

from __future__ import annotations

import enum
import math
from datetime import datetime
from typing import Annotated

import strawberry

from app.inference.types import ModelInfo as ModelInfoData
from app.jobs import events as ev
from app.jobs.domain import GenerationResult as ResultData
from app.jobs.domain import Job as JobData
from app.jobs.domain import Batch as BatchData
from app.jobs.domain import BatchStatus as BatchStatusData
from app.jobs.domain import DeliveryOutcome as DeliveryOutcomeData
from app.jobs.domain import JobStatus as JobStatusData
from app.jobs.domain import Page as PageData
from app.jobs.domain import ReviewVerdict as ReviewVerdictData
from app.jobs.domain import TokenRecord
from app.jobs.classification import Classification
from app.jobs.store import encode_cursor

# Token i of a job is event seq i + 3: JobQueued is 1 and GenerationStarted is 2.
FIRST_TOKEN_SEQ = 3

JobStatus = strawberry.enum(JobStatusData, name="JobStatus", description="Where a job is in its lifecycle.")


@strawberry.enum(description="Why generation stopped.")
class FinishReason(enum.Enum):
    STOP = "STOP"                    # the model ended its answer
    LENGTH = "LENGTH"                # maxTokens or the context length reached
    STOP_SEQUENCE = "STOP_SEQUENCE"  # a stop string appeared (it is not in the text)
    CANCELLED = "CANCELLED"
    DEADLINE = "DEADLINE"


@strawberry.enum(description="Who speaks in a chat message.")
class ChatRole(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@strawberry.type(description="The model that produced an answer. `version` fingerprints the loaded weights.")
class ModelInfo:
    id: str
    version: str = strawberry.field(description="First 12 hex chars of sha256 over the loaded weights.")
    parameters: int
    dtype: str
    device: str
    context_length: int
    source: str

    @classmethod
    def of(cls, m: ModelInfoData) -> ModelInfo:
        return cls(id=m.id, version=m.version, parameters=m.parameters, dtype=m.dtype, device=m.device,
                   context_length=m.context_length, source=m.source)


@strawberry.type
class TokenAlternative:
    text: str
    token_id: int
    logprob: float
    probability: float


@strawberry.interface(description="Fields every job event has. `seq` runs 1, 2, 3 ... per job.")
class JobEvent:
    job_id: strawberry.ID
    seq: int
    at: datetime


@strawberry.type(description="The job is accepted and waiting; `position` 0 is next.")
class JobQueued(JobEvent):
    position: int


@strawberry.type(description="The model started on the job.")
class GenerationStarted(JobEvent):
    model: ModelInfo
    prompt_tokens: int


@strawberry.type(description="One generated token. Probabilities are the model's own, before sampling warps them.")
class TokenGenerated(JobEvent):
    index: int
    text: str
    token_id: int
    logprob: float
    probability: float
    alternatives: list[TokenAlternative]

    @classmethod
    def of(cls, job_id: str, t: TokenRecord) -> TokenGenerated:
        return cls(
            job_id=strawberry.ID(job_id),
            seq=t.index + FIRST_TOKEN_SEQ,
            at=ev.epoch_to_dt(t.at),
            index=t.index,
            text=t.text,
            token_id=t.token_id,
            logprob=t.logprob,
            probability=math.exp(t.logprob),
            alternatives=[TokenAlternative(text=a[1], token_id=a[0], logprob=a[2], probability=math.exp(a[2]))
                          for a in t.alternatives],
        )


@strawberry.type(description="Confidence of the whole answer, from its tokens' logprobs.")
class Confidence:
    score: float = strawberry.field(description="exp(mean token logprob): geometric-mean probability, in (0, 1].")
    mean_logprob: float
    min_probability: float
    perplexity: float


@strawberry.type
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@strawberry.type(description="Milliseconds, measured from when the job was accepted.")
class Timing:
    queued_ms: float
    time_to_first_token_ms: float | None
    generation_ms: float
    total_ms: float
    tokens_per_second: float | None


def _usage(u) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def _timing(t) -> Timing:
    return Timing(queued_ms=t.queued_ms, time_to_first_token_ms=t.time_to_first_token_ms,
                  generation_ms=t.generation_ms, total_ms=t.total_ms, tokens_per_second=t.tokens_per_second)


@strawberry.type
class GenerationResult:
    text: str
    finish_reason: FinishReason
    confidence: Confidence
    needs_review: bool = strawberry.field(
        description="confidence.score is below the server's review threshold, or the answer is empty."
    )
    model: ModelInfo
    usage: Usage
    timing: Timing
    job_id: strawberry.Private[str]
    token_records: strawberry.Private[tuple[TokenRecord, ...]]

    @strawberry.field
    def tokens(self) -> list[TokenGenerated]:
        return [TokenGenerated.of(self.job_id, t) for t in self.token_records]

    @classmethod
    def of(cls, job_id: str, r: ResultData) -> GenerationResult:
        c = r.confidence
        return cls(
            text=r.text,
            finish_reason=FinishReason(r.finish_reason.value),
            confidence=Confidence(score=c.score, mean_logprob=c.mean_logprob, min_probability=c.min_probability,
                                  perplexity=c.perplexity),
            needs_review=r.needs_review,
            model=ModelInfo.of(r.model),
            usage=_usage(r.usage),
            timing=_timing(r.timing),
            job_id=job_id,
            token_records=r.tokens,
        )


@strawberry.type
class JobError:
    code: str
    message: str


@strawberry.type(description="The job finished; `result` holds the answer and its metadata.")
class GenerationCompleted(JobEvent):
    result: GenerationResult


@strawberry.type(description="The job failed; nothing was produced.")
class GenerationFailed(JobEvent):
    error: JobError


@strawberry.type(description="The job was cancelled or hit its deadline; `result` is the partial output.")
class GenerationCancelled(JobEvent):
    result: GenerationResult


GenerationEvent = Annotated[
    JobQueued | GenerationStarted | TokenGenerated | GenerationCompleted | GenerationFailed | GenerationCancelled,
    strawberry.union("GenerationEvent"),
]


def event_of(e: ev.JobEvent) -> GenerationEvent:
    jid = strawberry.ID(e.job_id)
    match e:
        case ev.TokenGenerated():
            return TokenGenerated.of(e.job_id, e.token)
        case ev.JobQueued():
            return JobQueued(job_id=jid, seq=e.seq, at=e.at, position=e.position)
        case ev.GenerationStarted():
            return GenerationStarted(job_id=jid, seq=e.seq, at=e.at, model=ModelInfo.of(e.model),
                                     prompt_tokens=e.prompt_tokens)
        case ev.GenerationCompleted():
            return GenerationCompleted(job_id=jid, seq=e.seq, at=e.at, result=GenerationResult.of(e.job_id, e.result))
        case ev.GenerationCancelled():
            return GenerationCancelled(job_id=jid, seq=e.seq, at=e.at, result=GenerationResult.of(e.job_id, e.result))
        case ev.GenerationFailed():
            return GenerationFailed(job_id=jid, seq=e.seq, at=e.at, error=JobError(code=e.error.code,
                                                                                   message=e.error.message))
    raise TypeError(f"unknown event {type(e).__name__}")


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
    async def webhook_deliveries(self, info: strawberry.Info) -> list[WebhookDelivery]:
        return [_delivery(d) for d in await info.context["reviews"].webhook_deliveries(str(self.id))]

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
            error=JobError(code=j.error.code, message=j.error.message) if j.error else None,
            batch_id=strawberry.ID(j.batch_id) if j.batch_id else None,
            review=Review(verdict=r.verdict, reviewer=r.reviewer, at=r.at, corrected_text=r.corrected_text)
            if r else None,
            attempts=j.attempts,
        )


def _delivery(d) -> WebhookDelivery:
    return WebhookDelivery(attempt=d.attempt, at=d.at, outcome=d.outcome, http_status=d.http_status,
                           error=d.error, next_retry_at=d.next_retry_at)


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


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
            edges=[JobEdge(cursor=encode_cursor(j.created_at, j.id), node=Job.of(j)) for j in page.items],
            page_info=PageInfo(has_next_page=page.has_next_page, end_cursor=page.end_cursor),
        )


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
    async def jobs(self, info: strawberry.Info, status: JobStatus | None = None, first: int = 20,
                   after: str | None = None) -> JobConnection:
        page = await info.context["jobs"].list_jobs(info.context["caller"], batch_id=str(self.id),
                                                       status=status, first=first, after=after)
        return JobConnection.of(page)

    @strawberry.field(description="Every attempt to call the batch's webhookUrl, oldest first.")
    async def webhook_deliveries(self, info: strawberry.Info) -> list[WebhookDelivery]:
        return [_delivery(d) for d in await info.context["reviews"].webhook_deliveries(str(self.id))]

    @classmethod
    def of(cls, b: BatchData) -> Batch:
        c = b.counts
        return cls(
            id=strawberry.ID(b.id), status=b.status, size=b.size, created_at=b.created_at,
            finished_at=b.finished_at,
            counts=BatchCounts(queued=c.queued, running=c.running, succeeded=c.succeeded, failed=c.failed,
                               cancelled=c.cancelled, expired=c.expired, total=c.total),
            usage=_usage(b.usage),
        )


@strawberry.type
class LabelScore:
    label: str
    probability: float
    logprob: float


@strawberry.type
class ClassificationResult:
    label: str
    confidence: float
    scores: list[LabelScore]
    needs_review: bool
    model: ModelInfo
    usage: Usage
    timing: Timing

    @classmethod
    def of(cls, c: Classification) -> ClassificationResult:
        return cls(
            label=c.label,
            confidence=c.confidence,
            scores=[LabelScore(label=s.label, probability=s.probability, logprob=s.logprob) for s in c.scores],
            needs_review=c.needs_review,
            model=ModelInfo.of(c.model),
            usage=_usage(c.usage),
            timing=_timing(c.timing),
        )


# ---- inputs -------------------------------------------------------------------------------


@strawberry.input
class ChatMessageInput:
    role: ChatRole
    content: str


@strawberry.input(description="Exactly one of `prompt` or `messages`.")
class GenerationInput:
    prompt: str | None = strawberry.field(
        default=None, description="Sent as one user message through the model's chat template (unless `raw`)."
    )
    messages: list[ChatMessageInput] | None = None
    max_tokens: int = 128
    temperature: float = strawberry.field(default=0.0, description="0 = greedy; up to 2.")
    top_p: float = 1.0
    seed: int | None = strawberry.field(default=None, description="Same seed and input give the same output.")
    stop: list[str] | None = None
    alternatives: int = strawberry.field(default=0, description="Top-k alternatives reported per token (0..10).")
    raw: bool = strawberry.field(default=False, description="Feed `prompt` verbatim, without the chat template.")


@strawberry.input
class JobOptions:
    priority: int = 0
    idempotency_key: str | None = None
    webhook_url: str | None = None
    deadline_seconds: float | None = None


@strawberry.input
class ClassificationInput:
    text: str
    labels: list[str]
    instruction: str | None = strawberry.field(
        default=None, description="System instruction; `{labels}` is replaced by the label list."
    )


@strawberry.type(description="Requests and tokens of one key on one model version, for billing.")
class UsageReport:
    key_id: str | None
    key_name: str | None
    model_version: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
