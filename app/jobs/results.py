"""Assemble a GenerationResult (confidence, usage, timing) from a finished run."""

from __future__ import annotations

from app.inference.confidence import confidence_from_logprobs
from app.inference.types import FinishReason, ModelInfo

from .domain import GenerationResult, TokenRecord, Timing, Usage


def build_result(
    *,
    tokens: list[TokenRecord],
    reason: FinishReason,
    model: ModelInfo,
    prompt_tokens: int,
    created: float,
    started: float | None,
    finished: float,
    review_threshold: float,
) -> GenerationResult:
    """Times are epoch seconds. A job that never started has queued the whole time."""
    text = "".join(t.text for t in tokens)
    confidence = confidence_from_logprobs([t.logprob for t in tokens])
    start = started if started is not None else finished
    generation_s = max(0.0, finished - start)
    first = tokens[0].at if tokens else None
    timing = Timing(
        queued_ms=max(0.0, start - created) * 1000,
        time_to_first_token_ms=max(0.0, first - created) * 1000 if first is not None else None,
        generation_ms=generation_s * 1000,
        total_ms=max(0.0, finished - created) * 1000,
        tokens_per_second=len(tokens) / generation_s if tokens and generation_s > 0 else None,
    )
    return GenerationResult(
        text=text,
        finish_reason=reason,
        confidence=confidence,
        # An empty answer carries no evidence, so a person should look at it.
        needs_review=(not text.strip()) or confidence.score < review_threshold,
        tokens=tuple(tokens),
        model=model,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(tokens)),
        timing=timing,
    )
