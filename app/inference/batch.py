"""The running batch: the requests the model decodes together and their KV cache.

Driven by the engine thread only. Each step the engine lets it admit waiting requests
(prefill, whole or in chunks) and decode one token for every running request; requests
join and leave between any two steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .backends import HFBackend, SlotBackend
from .model import LoadedModel
from .requests import Outbox, Sequence
from .sampling import choose
from .types import EngineStats, FinishReason, Started

log = logging.getLogger(__name__)


class RunningBatch:
    def __init__(self, lm: LoadedModel, backend: SlotBackend | HFBackend, outbox: Outbox, *, max_size: int,
                 prefills_per_step: int, prefill_chunk: int) -> None:
        self.lm = lm
        self.backend = backend
        self.stats = EngineStats()
        self.max_size = max_size
        self.prefills_per_step = prefills_per_step
        self.prefill_chunk = prefill_chunk
        self._outbox = outbox
        self._rows: list[Sequence] = []    # decoding, in the backend's rows 0..n-1
        self._filling: Sequence | None = None  # its prompt partly fed, in row n

    @property
    def running(self) -> int:
        return len(self._rows) + (self._filling is not None)

    @property
    def decoding(self) -> bool:
        return bool(self._rows)

    def cancel(self, cancels: dict[str, FinishReason]) -> None:
        for seq in self._rows:
            if seq.handle.request_id in cancels:
                seq.finish(cancels[seq.handle.request_id], self.lm, self._outbox)
        seq = self._filling
        if seq is not None and seq.handle.request_id in cancels:
            seq.finish(cancels[seq.handle.request_id], self.lm, self._outbox)
            self._filling = None
            self.backend.reorder(list(range(len(self._rows))))
        self._drop_done_rows()

    def fail_all(self, exc: Exception) -> None:
        for seq in self._rows:
            seq.finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
        if self._filling is not None:
            self._filling.finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
            self._filling = None
        self._rows = []
        self.backend.reset()

    def admit(self, next_waiting: Callable[[], Sequence | None]) -> None:
        """Feed prompts into the batch: whole ones while nothing runs; while others decode, at
        most `prefill_chunk` prompt tokens and `prefills_per_step` new requests per step, so a
        long prompt is spread over several steps instead of stalling the running streams."""
        running = bool(self._rows)
        budget = self.prefill_chunk if running and self.backend.chunked else None
        started = 0
        while budget is None or budget > 0:
            seq = self._filling
            if seq is None:
                if len(self._rows) >= self.max_size or (running and started >= self.prefills_per_step):
                    break
                seq = next_waiting()
                if seq is None:
                    break
                started += 1
                self._outbox.emit(seq.handle, Started(prompt_tokens=len(seq.prompt_ids), at=time.time(),
                                                      batch_size=len(self._rows) + 1))
                self._filling = seq
                try:
                    seq.fed = self.backend.begin(len(self._rows), seq.prompt_ids)
                except Exception as exc:
                    self._prefill_failed(seq, exc)
                    continue
            todo = len(seq.prompt_ids) - seq.fed
            n = todo if budget is None else min(todo, budget)
            try:
                logits = self.backend.prefill(len(self._rows), seq.prompt_ids, seq.fed, n)
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
                self.backend.reorder(list(range(len(self._rows))))
            else:
                self._rows.append(seq)
            self._outbox.flush()  # its first token goes out now, not after the other prefills

    def _prefill_failed(self, seq: Sequence, exc: Exception) -> None:
        log.error("prefill failed: %s", exc, exc_info=exc)
        self._filling = None
        seq.finish(FinishReason.ERROR, self.lm, self._outbox, error=str(exc))
        try:
            self.backend.reorder(list(range(len(self._rows))))
        except Exception:  # the batch's cache is in doubt: fail the batch rather than corrupt it
            log.exception("dropping a failed prefill's row failed")
            self.fail_all(exc)
        self._outbox.flush()

    def decode_step(self) -> None:
        rows = self._rows
        batch = len(rows)
        logits = self.backend.decode([s.next_token for s in rows], [s.position for s in rows])
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
        self.backend.reorder(order)
