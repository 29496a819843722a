"""Zero-shot classification results."""

from __future__ import annotations

import strawberry

from app.jobs.classification import Classification

from .common import ModelInfo, Timing, Usage


@strawberry.type(description="One label's score.")
class LabelScore:
    label: str = strawberry.field(description="The label.")
    probability: float = strawberry.field(description="The softmax of the labels' logprobs: they add up to 1.")
    logprob: float = strawberry.field(description="The sum of the label's token logprobs as the whole answer.")


@strawberry.type(description="Which label the model picked for the text, and how sure it was.")
class ClassificationResult:
    label: str = strawberry.field(description="The most probable label.")
    confidence: float = strawberry.field(description="That label's probability.")
    scores: list[LabelScore] = strawberry.field(description="Every label's score, in the order given.")
    needs_review: bool = strawberry.field(description="confidence is below the server's review threshold.")
    model: ModelInfo = strawberry.field(description="The model that scored it.")
    usage: Usage = strawberry.field(
        description="promptTokens counts one row per label (the prompt plus the longest label); "
                    "completionTokens is 0.")
    timing: Timing = strawberry.field(description="How long it took (no per-token figures).")

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
