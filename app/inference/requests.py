"""One request's side of the engine: its handle on the asyncio loop, its state on the
engine thread (Sequence: tokens chosen, detokenized, held back for stop strings), and the
Outbox that hands outputs from the engine thread to the loop once per step."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .detokenize import IncrementalDecoder, StopSequenceFilter
from .model import LoadedModel
from .sampling import Choice
from .types import EngineOutput, EngineStats, Finished, FinishReason, SamplingParams, TokenAlternative, TokenStep

if TYPE_CHECKING:
    from .engine import Engine


class RequestHandle:
    """The consumer side of one request: an async iterator of EngineOutput ending with Finished.

    Outputs wait in a deque with at most one waiter future: an asyncio.Queue's put and get
    paths (its loop checks, its getter and putter lists) cost several times as much per
    token, and a token's hand-off runs on the event loop beside the engine."""

    def __init__(self, request_id: str, engine: Engine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._outputs: collections.deque[EngineOutput] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        self._engine.cancel(self.request_id, reason)

    def deliver(self, output: EngineOutput) -> None:
        """Called by the engine, on the loop, for each output of this request."""
        self._outputs.append(output)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        outputs = self._outputs
        while True:
            while not outputs:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            item = outputs.popleft()
            yield item
            if isinstance(item, Finished):
                return


class Outbox:
    """Outputs gathered on the engine thread, handed to the loop in one call per flush.

    Every token the loop is handed costs it CPU (the job's records, the GraphQL message, the
    websocket write) on the cores the model computes on, and a decode step's OpenMP team is
    as slow as its slowest thread: that CPU came straight out of the model's time. So tokens
    of running requests are handed over at most every `interval` seconds, several per request
    at once; their subscribers that select TokensGenerated get them in one message. What a
    client waits for goes at once: a request's first token, and its end (or its start).

    A hand-off costs the loop about one message per running request, and a large batch's step
    outlasts a short interval, so the interval alone would hand over after every step. With
    `messages_per_s` set, it stretches to running / messages_per_s seconds when that is
    longer: the loop's token messages stay under that rate however many requests run (160:
    every 50 ms up to 8 running, every 100 ms at 16, every 400 ms at 64)."""

    def __init__(self, interval: float = 0.0, messages_per_s: int = 0) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_slot_free: Callable[[], None] | None = None  # called on the loop when a request ends
        self.interval = interval
        self.messages_per_s = messages_per_s
        self._pending: list[tuple[RequestHandle, EngineOutput]] = []
        self._urgent = False  # something pending that must not wait for the interval
        self._last = 0.0      # time.monotonic() of the last hand-off

    def emit(self, handle: RequestHandle, output: EngineOutput) -> None:
        self._pending.append((handle, output))
        if type(output) is not TokenStep or output.index == 0:
            self._urgent = True

    def flush(self, running: int = 0) -> None:
        """Hands what is pending to the loop, unless it is only tokens after a request's first
        and the last hand-off was less than the interval (for `running` requests) ago."""
        if not self._pending or self.loop is None:
            return
        interval = self.interval
        if self.messages_per_s:
            interval = max(interval, running / self.messages_per_s)
        if interval:
            now = time.monotonic()
            if not self._urgent and now - self._last < interval:
                return
            self._last = now
        self._urgent = False
        batch, self._pending = self._pending, []
        try:
            self.loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _deliver(self, batch: list[tuple[RequestHandle, EngineOutput]]) -> None:
        freed = False
        for handle, output in batch:
            handle.deliver(output)
            freed |= isinstance(output, Finished)
        if freed and self.on_slot_free is not None:
            self.on_slot_free()


@dataclass(eq=False)
class Sequence:
    """A request on the engine thread."""

    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    decoder: IncrementalDecoder
    stops: StopSequenceFilter
    generated: int = 0
    position: int = 0          # position id of next_token when it is fed
    fed: int = 0               # prompt tokens already in the KV cache
    next_token: int = -1
    peak_batch: int = 1
    done: bool = False
    unreleased: dict[int, tuple[Choice, float]] = field(default_factory=dict)

    def accept(self, choice: Choice, lm: LoadedModel, outbox: Outbox, stats: EngineStats) -> None:
        """Record one chosen token; emit what can be released; finish when a limit is hit."""
        if choice.token_id in lm.eos_ids:
            self.finish(FinishReason.STOP, lm, outbox)
            return
        index = self.generated
        self.generated += 1
        stats.tokens_generated += 1
        self.next_token = choice.token_id
        self.unreleased[index] = (choice, time.time())
        released, hit_stop = self.stops.feed(index, self.decoder.push(choice.token_id))
        self._release(released, lm, outbox)
        if hit_stop:
            self.finish(FinishReason.STOP_SEQUENCE, lm, outbox)
        elif (self.generated >= self.params.max_tokens
              or len(self.prompt_ids) + self.generated >= lm.info.context_length):
            self.finish(FinishReason.LENGTH, lm, outbox)

    def _release(self, released: list[tuple[int, str]], lm: LoadedModel, outbox: Outbox) -> None:
        for index, text in released:
            choice, at = self.unreleased.pop(index)
            alts = tuple(TokenAlternative(tid, lm.token_text(tid), lp) for tid, lp in choice.alternatives)
            outbox.emit(self.handle, TokenStep(index, choice.token_id, text, choice.logprob, alts, at))

    def finish(self, reason: FinishReason, lm: LoadedModel, outbox: Outbox, error: str | None = None) -> None:
        if self.done:
            return
        self._release(self.stops.flush(), lm, outbox)
        self.done = True
        outbox.emit(self.handle, Finished(reason=reason, at=time.time(), error=error, peak_batch_size=self.peak_batch))
