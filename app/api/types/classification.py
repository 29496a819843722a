"""Zero-shot classification results."""

from __future__ import annotations

import strawberry

from app.jobs.classification import Classification

from .common import ModelInfo, Timing, Usage


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
            usage=Usage.of(c.usage),
            timing=Timing.of(c.timing),
        )
