"""Types every area uses: the model, usage, timing, paging, and the shared enums."""

from __future__ import annotations

import enum

import strawberry

from app.inference.types import FinishReason as FinishReasonData
from app.inference.types import ModelInfo as ModelInfoData
from app.jobs.domain import JobStatus as JobStatusData
from app.jobs.domain import Timing as TimingData
from app.jobs.domain import Usage as UsageData


ARG_FIRST = strawberry.argument(description="How many items (1 to 100).")
ARG_AFTER = strawberry.argument(description="A cursor from an earlier page (`pageInfo.endCursor` or an edge's "
                                            "`cursor`): the page starts after it.")
ARG_STATUS = strawberry.argument(description="Only jobs in this status.")
ARG_ID = strawberry.argument(description="The id.")


def described_enum(cls: type[enum.Enum], name: str, description: str, values: dict[str, str]):
    """A job- or inference-layer enum as a GraphQL enum, with a description on every value
    (the layer below knows nothing of GraphQL, so they are given here)."""
    missing = {m.name for m in cls} ^ set(values)
    if missing:
        raise ValueError(f"{name}: descriptions missing or unknown for {sorted(missing)}")
    gql = strawberry.enum(cls, name=name, description=description)
    for value in gql.__strawberry_definition__.values:
        value.description = values[value.name]
    return gql


JobStatus = described_enum(JobStatusData, "JobStatus", "Where a job is in its lifecycle.", {
    "QUEUED": "Accepted, waiting for the model (see queuePosition).",
    "RUNNING": "The model is generating it.",
    "SUCCEEDED": "Finished with a result.",
    "FAILED": "Ended with an error and no result.",
    "CANCELLED": "Cancelled; a started job keeps its partial result.",
    "EXPIRED": "Its deadlineSeconds ran out; a started job keeps its partial result.",
})

FinishReason = described_enum(
    FinishReasonData, "FinishReason",
    "Why generation stopped: STOP (the model ended its answer), LENGTH (maxTokens or the context "
    "length reached), STOP_SEQUENCE (a stop string appeared; it is not in the text), CANCELLED, "
    "DEADLINE. ERROR is never on a result: a job that fails has an `error` instead.",
    {
        "STOP": "The model ended its answer.",
        "LENGTH": "maxTokens or the context length was reached.",
        "STOP_SEQUENCE": "A stop string appeared; it is cut from the text.",
        "CANCELLED": "The job was cancelled.",
        "DEADLINE": "The job's deadlineSeconds ran out.",
        "ERROR": "Never on a result: a failed job has an `error` instead.",
    },
)


@strawberry.type(description="The model that produced an answer. `version` fingerprints the loaded weights.")
class ModelInfo:
    id: str = strawberry.field(description="The model's name (the folder's name for a local model).")
    version: str = strawberry.field(description="First 12 hex chars of sha256 over the loaded weights.")
    parameters: int = strawberry.field(description="How many parameters the model has.")
    dtype: str = strawberry.field(description="The weights' data type as loaded, such as float32 or bfloat16.")
    device: str = strawberry.field(description="Where it runs: cpu, cuda or cuda:N.")
    context_length: int = strawberry.field(description="The most tokens (prompt plus answer) it can attend to.")
    source: str = strawberry.field(description="Where the weights came from (a package, or `local`).")

    @classmethod
    def of(cls, m: ModelInfoData) -> ModelInfo:
        return cls(id=m.id, version=m.version, parameters=m.parameters, dtype=m.dtype, device=m.device,
                   context_length=m.context_length, source=m.source)


@strawberry.type(description="Tokens counted for an answer.")
class Usage:
    prompt_tokens: int = strawberry.field(description="The prompt's tokens, after the chat template.")
    completion_tokens: int = strawberry.field(
        description="Tokens generated; the end-of-sequence token is not counted.")
    total_tokens: int = strawberry.field(description="promptTokens + completionTokens.")

    @classmethod
    def of(cls, u: UsageData) -> Usage:
        return cls(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


@strawberry.type(description="Milliseconds, measured from when the job was accepted.")
class Timing:
    queued_ms: float = strawberry.field(description="From acceptance to when the model started on it.")
    time_to_first_token_ms: float | None = strawberry.field(
        description="From acceptance to the first generated token; null when none was generated.")
    generation_ms: float = strawberry.field(description="From when the model started to when it finished.")
    total_ms: float = strawberry.field(description="From acceptance to the end.")
    tokens_per_second: float | None = strawberry.field(
        description="completionTokens / generationMs; null when no token was generated.")

    @classmethod
    def of(cls, t: TimingData) -> Timing:
        return cls(queued_ms=t.queued_ms, time_to_first_token_ms=t.time_to_first_token_ms,
                   generation_ms=t.generation_ms, total_ms=t.total_ms, tokens_per_second=t.tokens_per_second)


@strawberry.type(description="Where a page ends, and whether another follows.")
class PageInfo:
    has_next_page: bool = strawberry.field(description="More items follow this page.")
    end_cursor: str | None = strawberry.field(
        description="Pass as `after` for the next page; null on an empty page.")


@strawberry.type(description="Requests and tokens of one key on one model version, for billing.")
class UsageReport:
    key_id: str | None = strawberry.field(description="The API key's id; null for work done with auth off.")
    key_name: str | None = strawberry.field(description="The API key's name.")
    model_version: str = strawberry.field(description="The model version (weights hash) that did the work.")
    requests: int = strawberry.field(description="Billable requests: finished generations and classifications.")
    prompt_tokens: int = strawberry.field(description="Prompt tokens billed.")
    completion_tokens: int = strawberry.field(description="Completion tokens billed.")
    total_tokens: int = strawberry.field(description="promptTokens + completionTokens.")
