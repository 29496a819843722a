"""Types every area uses: the model, usage, timing, paging, and the shared enums."""

from __future__ import annotations

import strawberry

from app.inference.types import FinishReason as FinishReasonData
from app.inference.types import ModelInfo as ModelInfoData
from app.jobs.domain import JobStatus as JobStatusData
from app.jobs.domain import Timing as TimingData
from app.jobs.domain import Usage as UsageData

JobStatus = strawberry.enum(JobStatusData, name="JobStatus", description="Where a job is in its lifecycle.")

FinishReason = strawberry.enum(
    FinishReasonData, name="FinishReason",
    description="Why generation stopped: STOP (the model ended its answer), LENGTH (maxTokens or the context "
                "length reached), STOP_SEQUENCE (a stop string appeared; it is not in the text), CANCELLED, "
                "DEADLINE. ERROR is never on a result: a job that fails has an `error` instead.",
)


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
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, u: UsageData) -> Usage:
        return cls(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


@strawberry.type(description="Milliseconds, measured from when the job was accepted.")
class Timing:
    queued_ms: float
    time_to_first_token_ms: float | None
    generation_ms: float
    total_ms: float
    tokens_per_second: float | None

    @classmethod
    def of(cls, t: TimingData) -> Timing:
        return cls(queued_ms=t.queued_ms, time_to_first_token_ms=t.time_to_first_token_ms,
                   generation_ms=t.generation_ms, total_ms=t.total_ms, tokens_per_second=t.tokens_per_second)


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type(description="Requests and tokens of one key on one model version, for billing.")
class UsageReport:
    key_id: str | None
    key_name: str | None
    model_version: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
