"""Classifier: zero-shot classification, held to the same limits as generations.

A classification runs right away on the engine thread (between two decode steps): this
process's, or on an API-only replica a worker's (scoring.py). It does not go through the
job queue, but it counts against the caller's concurrency and tokens like a
job, and the classifications waiting for the engine are bounded (OVERLOADED past it).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from app.inference.classify import LabelScore, classification_length
from app.inference.model import LoadedModel
from app.inference.types import ModelInfo

from .domain import Caller, Timing, Usage
from .errors import InvalidInput, Overloaded
from .queue import JobQueue
from .quotas import QuotaStore
from .persistence.reports import ReportStore
from .scoring import Scorer
from .validation import Limits, validate_classification


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    scores: tuple[LabelScore, ...]
    needs_review: bool
    model: ModelInfo
    usage: Usage
    timing: Timing


class Classifier:
    def __init__(self, *, reports: ReportStore, scorer: Scorer, lm: LoadedModel, queue: JobQueue, quotas: QuotaStore,
                 limits: Limits, review_threshold: float, max_waiting: int = 16) -> None:
        self._reports = reports
        self._scorer = scorer
        self._lm = lm
        self._queue = queue
        self._quotas = quotas
        self.limits = limits
        self._review_threshold = review_threshold
        self._max_waiting = max_waiting
        self._waiting: Counter[str | None] = Counter()  # owner -> classifications waiting or running

    async def classify(self, text: str, labels: list[str], instruction: str | None, caller: Caller) -> Classification:
        validate_classification(text, labels, instruction, self.limits)
        width = classification_length(self._lm, text, labels, instruction)
        if width > self.limits.context_length:
            raise InvalidInput(
                f"text, instruction and the longest label take {width} tokens; the model's context length is "
                f"{self.limits.context_length}", field="text",
            )
        waiting = sum(self._waiting.values())
        if waiting >= self._max_waiting:
            raise Overloaded(f"{waiting} classifications are waiting for the model; retry shortly",
                             retryAfterMs=1000)
        # One row per label, each the prompt plus a label padded to the longest: that is the
        # compute it costs, and what it is billed (rows x width), not the prompt once.
        billed = width * len(labels)
        # It holds one of the caller's concurrent places while it waits and runs.
        await self._queue.reserve(caller.owner, 1, caller.concurrency)
        self._waiting[caller.owner] += 1
        try:
            return await self._run(text, labels, instruction, caller, billed)
        finally:
            self._waiting[caller.owner] -= 1
            await self._queue.unreserve(caller.owner, 1)

    async def _run(self, text: str, labels: list[str], instruction: str | None, caller: Caller,
                   billed: int) -> Classification:
        created = time.time()
        reservation = f"classify-{uuid.uuid4()}"
        await self._quotas.reserve_tokens(caller, [reservation], [billed])
        scored = None
        try:
            scoring = await self._scorer.score(text, labels, instruction)
            scored, started = scoring.scored, scoring.started
        finally:
            await self._quotas.settle(reservation, billed if scored else 0)
        finished = time.time()
        best = max(scored.scores, key=lambda s: s.probability)
        usage = Usage(prompt_tokens=billed, completion_tokens=0)
        await self._reports.record_usage(caller.owner, "classification", scoring.model.version, usage,
                                       datetime.now(UTC))
        return Classification(
            label=best.label,
            confidence=best.probability,
            scores=scored.scores,
            needs_review=best.probability < self._review_threshold,
            model=scoring.model,
            usage=usage,
            timing=Timing(
                queued_ms=(started - created) * 1000,
                time_to_first_token_ms=None,
                generation_ms=(finished - started) * 1000,
                total_ms=(finished - created) * 1000,
                tokens_per_second=None,
            ),
        )
