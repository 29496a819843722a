"""Continuous-batching generation engine.

One background thread owns the model. Each loop iteration it applies cancellations,
admits waiting requests (prefill, in chunks while others decode, into the running
batch), and runs one decode step for every running request at once. A request joins or
leaves the batch between any two decode steps, so a cancelled request frees its slot
within one step and a new one never waits for the batch to drain.

The batch's KV cache lives in a backend (backends.py): for Llama-family models a
preallocated per-row cache read in place by the lean forward (fastllama.py), otherwise
the Hugging Face forward with a left-padded cache. Outputs are handed to the asyncio loop
through the Outbox (requests.py): a request's first token and its end at once, the tokens
between at most every `stream_interval_ms` (longer with many requests running, see
Outbox); each request's RequestHandle yields them in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from app.futures import settle

from .backends import HFBackend, SlotBackend
from .detokenize import IncrementalDecoder, StopSequenceFilter
from .model import LoadedModel
from .batch import RunningBatch
from .requests import Outbox, RequestHandle, Sequence
from .sampling import make_generator
from .types import EngineStats, FinishReason, SamplingParams

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the engine admits."""


class EngineStopped(RuntimeError):
    pass


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch_size: int = 16,
        max_waiting: int = 64,
        prefills_per_step: int = 4,
        prefill_chunk: int | None = None,
        prefix_cache_tokens: int | None = None,
        stream_interval_ms: int | None = None,
        stream_messages_per_s: int | None = None,
    ) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        opts = lm.options
        if prefix_cache_tokens is None:
            prefix_cache_tokens = opts.prefix_cache_tokens
        fast = lm.fast_weights()
        if fast is not None:
            self._backend: SlotBackend | HFBackend = SlotBackend(fast, max_batch_size, prefix_cache_tokens)
        else:
            self._backend = HFBackend(lm.model, lm.device)
        if stream_interval_ms is None:
            stream_interval_ms = opts.stream_interval_ms
        if stream_messages_per_s is None:
            stream_messages_per_s = opts.stream_messages_per_s
        self._outbox = Outbox(interval=stream_interval_ms / 1000, messages_per_s=stream_messages_per_s)
        self._batch = RunningBatch(
            lm, self._backend, self._outbox, max_size=max_batch_size, prefills_per_step=prefills_per_step,
            prefill_chunk=max(1, prefill_chunk if prefill_chunk is not None else opts.prefill_chunk),
        )
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancels: dict[str, FinishReason] = {}
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- public, called from the asyncio loop -------------------------------------------

    @property
    def stats(self) -> EngineStats:
        return self._batch.stats

    @stats.setter
    def stats(self, stats: EngineStats) -> None:
        self._batch.stats = stats

    @property
    def on_slot_free(self) -> Callable[[], None] | None:
        """Called on the loop when a request ends (its batch slot is free)."""
        return self._outbox.on_slot_free

    @on_slot_free.setter
    def on_slot_free(self, callback: Callable[[], None] | None) -> None:
        self._outbox.on_slot_free = callback

    def start(self) -> None:
        self._loop = self._outbox.loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inferql-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def running(self) -> int:
        return self._batch.running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_capacity(self) -> bool:
        """True when a new request would start within a step instead of waiting."""
        return self.free_slots() > 0

    def free_slots(self) -> int:
        """How many new requests would start within a step instead of waiting."""
        return max(0, self.max_batch_size - self.running - len(self._waiting))

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        if self._thread is None or self._stopping:
            raise EngineStopped("engine is not running")
        handle = RequestHandle(request_id or f"r{next(self._ids)}", self)
        seq = Sequence(
            handle=handle,
            prompt_ids=list(prompt_ids),
            params=params,
            generator=make_generator(params, self.lm.device),
            decoder=IncrementalDecoder(self.lm.tokenizer),
            stops=StopSequenceFilter(params.stop),
        )
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(f"engine queue is full ({self.max_waiting} waiting)")
            self._waiting.append(seq)
            self._cv.notify()
        return handle

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        with self._cv:
            self._cancels[request_id] = reason
            self._cv.notify()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between two steps (it owns the model)."""
        if self._thread is None or self._stopping:
            raise EngineStopped("engine is not running")
        fut = asyncio.get_running_loop().create_future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return await fut

    # ---- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._batch.running or self._waiting or self._calls
                               or self._cancels):
                        self._cv.wait()
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, {}
                    calls = list(self._calls)
                    self._calls.clear()
                try:
                    self._apply_cancels(cancels)
                    self._run_calls(calls)
                    self._batch.admit(self._next_waiting)
                    if self._batch.decoding:
                        self._batch.decode_step()
                except Exception as exc:  # a failed step fails its requests, not the server
                    log.exception("engine step failed")
                    self._batch.fail_all(exc)
                self._outbox.flush(self._batch.running)
            self._fail_all(EngineStopped("server shutting down"))
            with self._cv:
                calls = list(self._calls)
                self._calls.clear()
            for _, fut in calls:  # nobody will run these now
                self._loop.call_soon_threadsafe(settle, fut, None, EngineStopped("server shutting down"))
            self._outbox.flush()

    def _run_calls(self, calls: list[tuple[Callable[[], Any], asyncio.Future]]) -> None:
        for fn, fut in calls:
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            self._loop.call_soon_threadsafe(settle, fut, result, error)

    def _apply_cancels(self, cancels: dict[str, FinishReason]) -> None:
        if not cancels:
            return
        with self._cv:
            for seq in [s for s in self._waiting if s.handle.request_id in cancels]:
                self._waiting.remove(seq)
                seq.finish(cancels[seq.handle.request_id], self.lm, self._outbox)
        self._batch.cancel(cancels)

    def _next_waiting(self) -> Sequence | None:
        with self._cv:
            return self._waiting.popleft() if self._waiting else None

    def _fail_all(self, exc: Exception) -> None:
        """Ends every request, running or waiting (the engine is stopping)."""
        self._batch.fail_all(exc)
        with self._cv:
            while self._waiting:
                self._waiting.popleft().finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
