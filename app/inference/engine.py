"""Continuous-batching generation engine.

One background thread owns the model. Each loop iteration it applies cancellations,
admits waiting requests (prefill, in chunks while others decode, into the running
batch), and runs one decode step for every running request at once. A request joins or
leaves the batch between any two decode steps, so a cancelled request frees its slot
within one step and a new one never waits for the batch to drain.

The batch's KV cache lives in a backend (backends.py): for Llama-family models a
preallocated per-row cache read in place by the lean forward (fastllama.py), otherwise
the Hugging Face forward with a left-padded cache. Outputs are handed to the asyncio loop
once per step through the Outbox (requests.py), where each request's RequestHandle
yields them in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from app.futures import settle

from .backends import HFBackend, SlotBackend
from .detokenize import IncrementalDecoder, StopSequenceFilter
from .model import LoadedModel
from .requests import Outbox, RequestHandle, Sequence
from .sampling import choose, make_generator
from .types import EngineStats, FinishReason, SamplingParams, Started

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
    ) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.prefills_per_step = prefills_per_step
        opts = lm.options
        self.prefill_chunk = max(1, prefill_chunk if prefill_chunk is not None else opts.prefill_chunk)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = opts.prefix_cache_tokens
        fast = lm.fast_weights()
        if fast is not None:
            self._backend: SlotBackend | HFBackend = SlotBackend(fast, max_batch_size, prefix_cache_tokens)
        else:
            self._backend = HFBackend(lm.model, lm.device)
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancels: dict[str, FinishReason] = {}
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future]] = deque()
        self._rows: list[Sequence] = []    # decoding, in the backend's rows 0..n-1
        self._filling: Sequence | None = None  # its prompt partly fed, in row n
        self._outbox = Outbox()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- public, called from the asyncio loop -------------------------------------------

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
    def backend(self) -> str:
        """"fast" (the lean Llama forward, per-row cache) or "hf" (the Hugging Face forward)."""
        return "fast" if isinstance(self._backend, SlotBackend) else "hf"

    @property
    def ready(self) -> bool:
        """Whether the engine serves at full speed. There is no warm-up to wait for: torch.compile
        did not pay on CPU (see README, Performance), so the engine is ready once started."""
        return self._thread is not None and not self._stopping

    @property
    def running(self) -> int:
        return len(self._rows) + (self._filling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_capacity(self) -> bool:
        """True when a new request would start within a step instead of waiting."""
        return self.running + len(self._waiting) < self.max_batch_size

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
                    while not (self._stopping or self._rows or self._filling or self._waiting or self._calls
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
                    self._admit()
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # a failed step fails its requests, not the server
                    log.exception("engine step failed")
                    self._fail_all(exc)
                self._outbox.flush()
            self._fail_all(EngineStopped("server shutting down"), include_waiting=True)
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
        for seq in self._rows:
            if seq.handle.request_id in cancels:
                seq.finish(cancels[seq.handle.request_id], self.lm, self._outbox)
        seq = self._filling
        if seq is not None and seq.handle.request_id in cancels:
            seq.finish(cancels[seq.handle.request_id], self.lm, self._outbox)
            self._filling = None
            self._backend.reorder(list(range(len(self._rows))))
        self._drop_done_rows()

    def _admit(self) -> None:
        """Feed prompts into the batch: whole ones while nothing runs; while others decode, at
        most `prefill_chunk` prompt tokens and `prefills_per_step` new requests per step, so a
        long prompt is spread over several steps instead of stalling the running streams."""
        running = bool(self._rows)
        budget = self.prefill_chunk if running and self._backend.chunked else None
        started = 0
        while budget is None or budget > 0:
            seq = self._filling
            if seq is None:
                if len(self._rows) >= self.max_batch_size or (running and started >= self.prefills_per_step):
                    break
                with self._cv:
                    if not self._waiting:
                        break
                    seq = self._waiting.popleft()
                started += 1
                self._outbox.emit(seq.handle, Started(prompt_tokens=len(seq.prompt_ids), at=time.time(),
                                        batch_size=len(self._rows) + 1))
                self._filling = seq
                try:
                    seq.fed = self._backend.begin(len(self._rows), seq.prompt_ids)
                except Exception as exc:
                    self._prefill_failed(seq, exc)
                    continue
            todo = len(seq.prompt_ids) - seq.fed
            n = todo if budget is None else min(todo, budget)
            try:
                logits = self._backend.prefill(len(self._rows), seq.prompt_ids, seq.fed, n)
            except Exception as exc:
                self._prefill_failed(seq, exc)
                continue
            seq.fed += n
            if budget is not None:
                budget -= n
            if seq.fed < len(seq.prompt_ids):
                continue  # the rest of this prompt in the next steps
            self._filling = None
            self.stats.prefills += 1
            seq.position = len(seq.prompt_ids)
            [choice] = choose(logits[None], [(seq.params, seq.generator)])
            seq.accept(choice, self.lm, self._outbox, self.stats)
            if seq.done:  # ended at its first token: its row is not kept
                self._backend.reorder(list(range(len(self._rows))))
            else:
                self._rows.append(seq)
            self._outbox.flush()  # its first token goes out now, not after the other prefills

    def _prefill_failed(self, seq: Sequence, exc: Exception) -> None:
        log.error("prefill failed: %s", exc, exc_info=exc)
        self._filling = None
        seq.finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
        try:
            self._backend.reorder(list(range(len(self._rows))))
        except Exception:  # the batch's cache is in doubt: fail the batch rather than corrupt it
            log.exception("dropping a failed prefill's row failed")
            self._fail_all(exc)
        self._outbox.flush()

    def _decode_step(self) -> None:
        rows = self._rows
        batch = len(rows)
        logits = self._backend.decode([s.next_token for s in rows], [s.position for s in rows])
        choices = choose(logits, [(s.params, s.generator) for s in rows])
        stats = self.stats
        stats.decode_steps += 1
        stats.max_batch_size = max(stats.max_batch_size, batch)
        stats.batch_size_histogram[batch] = stats.batch_size_histogram.get(batch, 0) + 1
        if batch > 1:
            stats.shared_decode_steps += 1
        for seq, choice in zip(rows, choices):
            seq.position += 1
            seq.peak_batch = max(seq.peak_batch, batch)
            seq.accept(choice, self.lm, self._outbox, self.stats)
        self._drop_done_rows()

    def _drop_done_rows(self) -> None:
        if all(not s.done for s in self._rows):
            return
        # The last running row moves into each hole (one row's copy, not a shift of many).
        order = list(range(len(self._rows)))
        for i in reversed(range(len(self._rows))):
            if self._rows[i].done:
                order[i] = order[-1]
                order.pop()
        rows = [self._rows[i] for i in order]
        if self._filling is not None:  # the prompt being fed sits right after the running rows
            order.append(len(self._rows))
        self._rows = rows
        self._backend.reorder(order)

    def _fail_all(self, exc: Exception, include_waiting: bool = False) -> None:
        for seq in self._rows:
            seq.finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
        if self._filling is not None:
            self._filling.finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
            self._filling = None
        self._rows = []
        self._backend.reset()
        if include_waiting:
            with self._cv:
                while self._waiting:
                    self._waiting.popleft().finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
