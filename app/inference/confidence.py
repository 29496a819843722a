"""Answer-level confidence from per-token logprobs (the model's own distribution)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Confidence:
    score: float            # exp(mean logprob): the geometric-mean token probability, in (0, 1]
    mean_logprob: float
    min_probability: float  # the least likely token the answer contains
    perplexity: float       # exp(-mean logprob)


def confidence_from_logprobs(logprobs: list[float]) -> Confidence:
    if not logprobs:
        # Nothing was generated: there is no evidence either way; report the neutral values.
        return Confidence(score=1.0, mean_logprob=0.0, min_probability=1.0, perplexity=1.0)
    mean = sum(logprobs) / len(logprobs)
    return Confidence(
        score=math.exp(mean),
        mean_logprob=mean,
        min_probability=math.exp(min(logprobs)),
        perplexity=math.exp(-mean),
    )
