"""Continuous-batching generation engine.

One background thread owns the model. Each loop iteration it applies cancellations,
admits waiting requests (prefill, one forward each, merged into the running batch),
and runs one decode step for every running request at once. A request joins or leaves
the batch between any two decode steps, so a cancelled request frees its slot within
one step and a new one never waits for the batch to drain.

The running batch keeps one KV cache, left-padded: every row's keys end at the same
column, the attention mask hides each row's padding, and position ids are per row.
Outputs are handed to the asyncio loop once per step (call_soon_threadsafe), where each
request's RequestHandle yields them in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .detokenize import IncrementalDecoder, StopSequenceFilter
from .model import LoadedModel
from .sampling import Choice, choose, make_generator
from .types import (
    EngineOutput,
    EngineStats,
    Finished,
    FinishReason,
    SamplingParams,
    Started,
    TokenAlternative,
    TokenStep,
)

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the engine admits."""


class EngineStopped(RuntimeError):
    pass


class RequestHandle:
    """The consumer side of one request: an async iterator of EngineOutput ending with Finished."""

    def __init__(self, request_id: str, engine: Engine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.finished: Finished | None = None

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        self._engine.cancel(self.request_id, reason)

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            item = await self._queue.get()
            yield item
            if isinstance(item, Finished):
                self.finished = item
                return


@dataclass(eq=False)
class _Seq:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    decoder: IncrementalDecoder
    stops: StopSequenceFilter
    generated: int = 0
    position: int = 0          # position id of next_token when it is fed
    next_token: int = -1
    peak_batch: int = 1
    done: bool = False
    unreleased: dict[int, tuple[Choice, float]] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch_size: int = 16,
        max_waiting: int = 64,
        prefills_per_step: int = 4,
    ) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.prefills_per_step = prefills_per_step
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._cancels: dict[str, FinishReason] = {}
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future]] = deque()
        self._rows: list[_Seq] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._outbox: list[tuple[RequestHandle, EngineOutput]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_slot_free: Callable[[], None] | None = None  # called on the loop when a request ends

    # ---- public, called from the asyncio loop -------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
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
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_capacity(self) -> bool:
        """True when a new request would start within a step instead of waiting."""
        return len(self._rows) + len(self._waiting) < self.max_batch_size

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        if self._thread is None or self._stopping:
            raise EngineStopped("engine is not running")
        handle = RequestHandle(request_id or f"r{next(self._ids)}", self)
        seq = _Seq(
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
                    while not (self._stopping or self._rows or self._waiting or self._calls or self._cancels):
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
                self._flush()
            self._fail_all(EngineStopped("server shutting down"), include_waiting=True)
            with self._cv:
                calls = list(self._calls)
                self._calls.clear()
            for _, fut in calls:  # nobody will run these now
                self._loop.call_soon_threadsafe(_settle, fut, None, EngineStopped("server shutting down"))
            self._flush()

    def _emit(self, seq: _Seq, output: EngineOutput) -> None:
        self._outbox.append((seq.handle, output))

    def _flush(self) -> None:
        if self._outbox and self._loop is not None:
            batch, self._outbox = self._outbox, []
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # loop closed during shutdown
                pass

    def _deliver(self, batch: list[tuple[RequestHandle, EngineOutput]]) -> None:
        freed = False
        for handle, output in batch:
            handle._queue.put_nowait(output)
            freed |= isinstance(output, Finished)
        if freed and self.on_slot_free is not None:
            self.on_slot_free()

    def _run_calls(self, calls: list[tuple[Callable[[], Any], asyncio.Future]]) -> None:
        for fn, fut in calls:
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            self._loop.call_soon_threadsafe(_settle, fut, result, error)

    def _apply_cancels(self, cancels: dict[str, FinishReason]) -> None:
        if not cancels:
            return
        with self._cv:
            for seq in [s for s in self._waiting if s.handle.request_id in cancels]:
                self._waiting.remove(seq)
                self._finish(seq, cancels[seq.handle.request_id])
        for seq in self._rows:
            if seq.handle.request_id in cancels:
                self._finish(seq, cancels[seq.handle.request_id])
        self._drop_done_rows()

    def _admit(self) -> None:
        limit = self.max_batch_size - len(self._rows)
        if self._rows:
            limit = min(limit, self.prefills_per_step)  # keep running streams moving
        newcomers = []
        for _ in range(max(0, limit)):
            with self._cv:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            try:
                cache = self._prefill(seq, batch_size=len(self._rows) + len(newcomers) + 1)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(seq, FinishReason.ERROR, error=str(exc))
                continue
            finally:
                self._flush()  # its first token goes out now, not after the other prefills
            if not seq.done:
                newcomers.append((seq, cache))
        if newcomers:
            try:
                self._merge(newcomers)
            except Exception as exc:  # they are in no batch yet: finish them here
                log.exception("merging new requests into the batch failed")
                for seq, _ in newcomers:
                    self._finish(seq, FinishReason.ERROR, error=str(exc))

    def _prefill(self, seq: _Seq, batch_size: int) -> DynamicCache:
        self._emit(seq, Started(prompt_tokens=len(seq.prompt_ids), at=time.time(), batch_size=batch_size))
        cache = DynamicCache(config=self.lm.model.config)
        ids = torch.tensor([seq.prompt_ids], device=self.lm.device)
        out = self.lm.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        self.stats.prefills += 1
        seq.position = len(seq.prompt_ids)
        [choice] = choose(out.logits[:, -1], [(seq.params, seq.generator)])
        self._accept(seq, choice)
        return cache

    def _merge(self, newcomers: list[tuple[_Seq, DynamicCache]]) -> None:
        """Append newly prefilled rows to the running batch, left-padding to a common length."""
        parts: list[tuple[DynamicCache, torch.Tensor]] = []
        if self._cache is not None:
            parts.append((self._cache, self._mask))
        for seq, cache in newcomers:
            parts.append((cache, torch.ones(1, len(seq.prompt_ids), dtype=torch.long, device=self.lm.device)))
        width = max(mask.shape[1] for _, mask in parts)
        merged = DynamicCache(config=self.lm.model.config)
        for li, layer in enumerate(merged.layers):
            keys = [F.pad(c.layers[li].keys, (0, 0, width - m.shape[1], 0)) for c, m in parts]
            values = [F.pad(c.layers[li].values, (0, 0, width - m.shape[1], 0)) for c, m in parts]
            layer.lazy_initialization(keys[0], values[0])
            layer.keys, layer.values = torch.cat(keys), torch.cat(values)
        self._mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m in parts])
        self._cache = merged
        self._rows.extend(seq for seq, _ in newcomers)

    def _decode_step(self) -> None:
        rows = self._rows
        batch = len(rows)
        dev = self.lm.device
        input_ids = torch.tensor([[s.next_token] for s in rows], device=dev)
        positions = torch.tensor([[s.position] for s in rows], device=dev)
        self._mask = torch.cat([self._mask, torch.ones(batch, 1, dtype=self._mask.dtype, device=dev)], dim=1)
        out = self.lm.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
        )
        choices = choose(out.logits[:, -1], [(s.params, s.generator) for s in rows])
        stats = self.stats
        stats.decode_steps += 1
        stats.max_batch_size = max(stats.max_batch_size, batch)
        stats.batch_size_histogram[batch] = stats.batch_size_histogram.get(batch, 0) + 1
        if batch > 1:
            stats.shared_decode_steps += 1
        for seq, choice in zip(rows, choices):
            seq.position += 1
            seq.peak_batch = max(seq.peak_batch, batch)
            self._accept(seq, choice)
        self._drop_done_rows()

    def _accept(self, seq: _Seq, choice: Choice) -> None:
        """Record one chosen token; emit what can be released; finish when a limit is hit."""
        if choice.token_id in self.lm.eos_ids:
            self._finish(seq, FinishReason.STOP)
            return
        index = seq.generated
        seq.generated += 1
        self.stats.tokens_generated += 1
        seq.next_token = choice.token_id
        seq.unreleased[index] = (choice, time.time())
        released, hit_stop = seq.stops.feed(index, seq.decoder.push(choice.token_id))
        self._release(seq, released)
        if hit_stop:
            self._finish(seq, FinishReason.STOP_SEQUENCE)
        elif (seq.generated >= seq.params.max_tokens
              or len(seq.prompt_ids) + seq.generated >= self.lm.info.context_length):
            self._finish(seq, FinishReason.LENGTH)

    def _release(self, seq: _Seq, released: list[tuple[int, str]]) -> None:
        for index, text in released:
            choice, at = seq.unreleased.pop(index)
            alts = tuple(TokenAlternative(tid, self.lm.token_text(tid), lp) for tid, lp in choice.alternatives)
            self._emit(seq, TokenStep(index, choice.token_id, text, choice.logprob, alts, at))

    def _finish(self, seq: _Seq, reason: FinishReason, error: str | None = None) -> None:
        if seq.done:
            return
        self._release(seq, seq.stops.flush())
        seq.done = True
        self._emit(seq, Finished(reason=reason, at=time.time(), error=error, peak_batch_size=seq.peak_batch))

    def _drop_done_rows(self) -> None:
        keep = [i for i, s in enumerate(self._rows) if not s.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.lm.device)
        mask = self._mask.index_select(0, index)
        # Columns that are padding for every remaining row are dead weight: cut them.
        lead = int((mask.cumsum(dim=1) == 0).sum(dim=1).min().item())
        self._mask = mask[:, lead:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, lead:]
            layer.values = layer.values.index_select(0, index)[:, :, lead:]

    def _fail_all(self, exc: Exception, include_waiting: bool = False) -> None:
        for seq in self._rows:
            self._finish(seq, FinishReason.ERROR, error=str(exc))
        self._rows, self._cache, self._mask = [], None, None
        if include_waiting:
            with self._cv:
                while self._waiting:
                    self._finish(self._waiting.popleft(), FinishReason.ERROR, error=str(exc))


def _settle(fut: asyncio.Future, result: Any, error: Exception | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
