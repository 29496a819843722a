"""Plain data that crosses the inference layer's boundary (no torch, no GraphQL)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "STOP"                    # the model emitted an end-of-sequence token
    LENGTH = "LENGTH"                # maxTokens reached
    STOP_SEQUENCE = "STOP_SEQUENCE"  # one of the request's stop strings appeared
    CANCELLED = "CANCELLED"          # the client or an operator cancelled it
    DEADLINE = "DEADLINE"            # the job's deadline passed while it ran
    ERROR = "ERROR"                  # the engine failed while running it


@dataclass(frozen=True)
class ModelInfo:
    id: str
    version: str
    parameters: int
    dtype: str
    device: str
    context_length: int
    source: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    alternatives: int = 0      # top-k alternatives reported per token


@dataclass(frozen=True)
class TokenAlternative:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenStep:
    """One generated token. `logprob` is from the model's unwarped distribution."""

    index: int
    token_id: int
    text: str
    logprob: float
    alternatives: tuple[TokenAlternative, ...] = ()
    at: float = 0.0  # time.time() when produced


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    at: float
    batch_size: int  # rows in the running batch once this request joined


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    at: float
    error: str | None = None
    peak_batch_size: int = 1  # the largest batch this request decoded in


EngineOutput = Started | TokenStep | Finished


@dataclass
class EngineStats:
    """Counters the engine keeps about itself; read by metrics and tests."""

    decode_steps: int = 0
    prefills: int = 0
    tokens_generated: int = 0
    shared_decode_steps: int = 0   # decode steps that served more than one request
    max_batch_size: int = 0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)
