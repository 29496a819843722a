"""A job's event stream (the GenerationEvent union) and the answer it ends with."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated

import strawberry

from app.inference.types import TokenAlternative as AlternativeData
from app.jobs import events as ev
from app.jobs.domain import GenerationResult as ResultData
from app.jobs.domain import JobError as JobErrorData
from app.jobs.domain import JobErrorCode as JobErrorCodeData
from app.jobs.domain import TokenRecord

from .common import FinishReason, ModelInfo, Timing, Usage, described_enum


@strawberry.type(description="A token the model also considered at this position, with its own probability.")
class TokenAlternative:
    text: str = strawberry.field(description="The token's text.")
    token_id: int = strawberry.field(description="The token's id in the model's vocabulary.")
    logprob: float = strawberry.field(description="Its log-probability under the model's own distribution.")
    probability: float = strawberry.field(description="exp(logprob).")

    @classmethod
    def of(cls, a: AlternativeData) -> TokenAlternative:
        return cls(text=a.text, token_id=a.token_id, logprob=a.logprob, probability=math.exp(a.logprob))


@strawberry.interface(description="Fields every job event has. `seq` runs 1, 2, 3 ... per job.")
class JobEvent:
    job_id: strawberry.ID = strawberry.field(description="The job this event belongs to.")
    seq: int = strawberry.field(
        description="1, 2, 3 ... per job; pass the last one seen as jobEvents' `after` to resume. A JobQueued "
                    "sent again with a new position keeps the seq of the JobQueued it updates.")
    at: datetime = strawberry.field(description="When it happened.")


@strawberry.type(description="The job is accepted and waiting; `position` 0 is next. While it waits, a live "
                             "stream sends it again (same seq) whenever its position changes; a replay of a job "
                             "that already started shows only the first.")
class JobQueued(JobEvent):
    position: int = strawberry.field(description="How many jobs run before this one; 0 = next.")


@strawberry.type(description="The model started on the job.")
class GenerationStarted(JobEvent):
    model: ModelInfo = strawberry.field(description="The model that runs it.")
    prompt_tokens: int = strawberry.field(description="The prompt's tokens, after the chat template.")


@strawberry.type(description="One generated token. Probabilities are the model's own, before sampling warps them.")
class TokenGenerated(JobEvent):
    index: int = strawberry.field(description="0 for the first generated token, then 1, 2 ...")
    text: str = strawberry.field(description="The text this token adds to the answer.")
    token_id: int = strawberry.field(description="The token's id in the model's vocabulary.")
    logprob: float = strawberry.field(description="Its log-probability under the model's own distribution "
                                                  "(softmax of the raw logits, before temperature or topP).")
    probability: float = strawberry.field(description="exp(logprob).")
    alternatives: list[TokenAlternative] = strawberry.field(
        description="The `alternatives` most likely tokens at this step (empty unless asked for).")

    @classmethod
    def of(cls, job_id: str, seq: int, t: TokenRecord) -> TokenGenerated:
        return cls(
            job_id=strawberry.ID(job_id), seq=seq, at=ev.epoch_to_dt(t.at), index=t.index, text=t.text,
            token_id=t.token_id, logprob=t.logprob, probability=math.exp(t.logprob),
            alternatives=[TokenAlternative.of(a) for a in t.alternatives],
        )


@strawberry.type(
    description="Tokens generated in a row, sent in one message because the subscriber fell behind the model."
    " Sent only to a subscription whose selection names this type (`... on TokensGenerated`); others get one"
    " TokenGenerated per token. Each token keeps its own `seq`; the event's `seq` and `at` are its last token's,"
    " so `jobEvents(after: seq)` resumes right after it."
)
class TokensGenerated(JobEvent):
    tokens: list[TokenGenerated] = strawberry.field(description="The tokens, in order, each with its own seq.")

    @classmethod
    def of(cls, events: list[ev.TokenGenerated]) -> TokensGenerated:
        last = events[-1]
        return cls(job_id=strawberry.ID(last.job_id), seq=last.seq, at=last.at,
                   tokens=[TokenGenerated.of(e.job_id, e.seq, e.token) for e in events])


@strawberry.type(description="Confidence of the whole answer, from its tokens' logprobs.")
class Confidence:
    score: float = strawberry.field(description="exp(mean token logprob): geometric-mean probability, in (0, 1].")
    mean_logprob: float = strawberry.field(description="The mean of the answer's token logprobs.")
    min_probability: float = strawberry.field(description="The probability of the least likely token.")
    perplexity: float = strawberry.field(description="exp(-meanLogprob).")


@strawberry.type(description="A generation's answer, with its confidence, model, usage and timing.")
class GenerationResult:
    text: str = strawberry.field(description="The answer (a stop string that ended it is cut).")
    finish_reason: FinishReason = strawberry.field(description="Why generation stopped.")
    confidence: Confidence = strawberry.field(description="How sure the model was of the whole answer.")
    needs_review: bool = strawberry.field(
        description="confidence.score is below the server's review threshold, or the answer is empty."
    )
    model: ModelInfo = strawberry.field(description="The model that produced it.")
    usage: Usage = strawberry.field(description="Its token counts.")
    timing: Timing = strawberry.field(description="How long it took.")
    job_id: strawberry.Private[str]
    token_records: strawberry.Private[tuple[TokenRecord, ...]]

    @strawberry.field(description="Every generated token, in order, with its probability and alternatives.")
    def tokens(self) -> list[TokenGenerated]:
        return [TokenGenerated.of(self.job_id, t.seq, t) for t in self.token_records]

    @classmethod
    def of(cls, job_id: str, r: ResultData) -> GenerationResult:
        c = r.confidence
        return cls(
            text=r.text,
            finish_reason=r.finish_reason,
            confidence=Confidence(score=c.score, mean_logprob=c.mean_logprob, min_probability=c.min_probability,
                                  perplexity=c.perplexity),
            needs_review=r.needs_review,
            model=ModelInfo.of(r.model),
            usage=Usage.of(r.usage),
            timing=Timing.of(r.timing),
            job_id=job_id,
            token_records=r.tokens,
        )


JobErrorCode = described_enum(JobErrorCodeData, "JobErrorCode", "Why a job failed.", {
    "ENGINE_ERROR": "The model failed while generating; trying again may work.",
    "WORKER_LOST": "The worker running it stopped more often than the server's maximum attempts allow.",
    "INTERNAL": "The job could not be recorded, or something unexpected happened (the server log says more).",
})


@strawberry.type(description="Why a job failed. This is job data, not a GraphQL error.")
class JobError:
    code: JobErrorCode = strawberry.field(description="What kind of failure.")
    message: str = strawberry.field(description="A short text for people.")

    @classmethod
    def of(cls, e: JobErrorData) -> JobError:
        try:
            code = JobErrorCodeData(e.code)
        except ValueError:  # a code this API version does not know
            code = JobErrorCodeData.INTERNAL
        return cls(code=code, message=e.message)


@strawberry.type(description="The job finished; `result` holds the answer and its metadata.")
class GenerationCompleted(JobEvent):
    result: GenerationResult = strawberry.field(description="The answer.")


@strawberry.type(description="The job failed; nothing was produced.")
class GenerationFailed(JobEvent):
    error: JobError = strawberry.field(description="Why it failed.")


@strawberry.type(description="The job was cancelled or hit its deadline; `result` is the partial output.")
class GenerationCancelled(JobEvent):
    result: GenerationResult = strawberry.field(description="The partial answer (may be empty).")


GenerationEvent = Annotated[
    JobQueued | GenerationStarted | TokenGenerated | GenerationCompleted | GenerationFailed | GenerationCancelled
    | TokensGenerated,
    strawberry.union("GenerationEvent", description="One event of a job's stream; every member implements "
                                                    "JobEvent (jobId, seq, at)."),
]


def event_of(e: ev.JobEvent) -> GenerationEvent:
    jid = strawberry.ID(e.job_id)
    match e:
        case ev.TokenGenerated():
            return TokenGenerated.of(e.job_id, e.seq, e.token)
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
            return GenerationFailed(job_id=jid, seq=e.seq, at=e.at, error=JobError.of(e.error))
    raise TypeError(f"unknown event {type(e).__name__}")
