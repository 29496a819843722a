"""The job queue: which stored QUEUED job runs next, and how many each key has active.

Order: highest priority first; within a priority, round-robin across owners (API keys),
FIFO within an owner. The round-robin is virtual-time fair queueing: each job gets a tag
one past the larger of its owner's last tag and the tag last claimed, so a key with 100
queued jobs delays another key's single job by about one turn, not by 100.

Admission is check-and-reserve: `reserve` checks the owner's active count (queued or
running) and the queue's room and takes the places in one step, so concurrent
submissions cannot all pass a limit that only some of them fit. Each reservation ends in
`put(..., reserved=True)` or `unreserve`; each claimed job ends in `done`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from .domain import Job
from .errors import Overloaded, RateLimited


@dataclass(frozen=True)
class QueuedJob:
    job: Job
    prompt_ids: list[int]


class JobQueue(Protocol):
    max_queued: int

    async def reserve(self, owner: str | None, n: int, owner_limit: int | None) -> None:
        """Takes n places for owner; RateLimited past owner_limit active jobs, Overloaded
        past max_queued waiting ones."""

    async def unreserve(self, owner: str | None, n: int) -> None:
        """Gives back reserved places whose jobs will not be put."""

    async def put(self, job: Job, prompt_ids: list[int], *, reserved: bool = True) -> int:
        """Queues a stored job; returns its position (0 = next to run)."""

    async def claim(self, n: int) -> list[QueuedJob]:
        """Takes up to n jobs off the queue, in order, for a worker."""

    async def remove(self, job_id: str) -> QueuedJob | None:
        """Takes a waiting job off the queue (to cancel it); None when it is not waiting."""

    async def done(self, job: Job) -> None:
        """A claimed or removed job ended (its end is stored): its owner's place is free."""

    async def position(self, job_id: str) -> int | None:
        """0 = next to run; None when the job is not waiting."""

    async def active(self, owner: str | None) -> int:
        """The owner's jobs reserved, waiting or running."""

    async def depth(self) -> int:
        """Jobs waiting, counting reserved places."""

    async def wait_for_work(self) -> None:
        """Returns once a job may be waiting (spurious wake-ups allowed)."""


@dataclass(order=True)
class _Entry:
    sort_key: tuple[int, int, int]  # (-priority, fair-queueing tag, arrival)
    queued: QueuedJob = field(compare=False)


class MemoryJobQueue:
    """The in-process JobQueue: a heap, in this process's memory."""

    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        self._heap: list[_Entry] = []
        self._waiting: dict[str, _Entry] = {}
        self._virtual_time: dict[int, int] = {}             # priority -> tag last claimed
        self._owner_tag: dict[tuple[int, str | None], int] = {}
        self._active: Counter[str | None] = Counter()       # owner -> reserved, waiting or running
        self._reserved = 0
        self._order = itertools.count()
        self._work = asyncio.Event()

    async def reserve(self, owner: str | None, n: int, owner_limit: int | None) -> None:
        if owner_limit is not None and self._active[owner] + n > owner_limit:
            raise RateLimited(
                f"rate limit: {owner_limit} generations queued or running at once for this key",
                limit="concurrency", retryAfterMs=1000,
            )
        waiting = len(self._waiting) + self._reserved
        if n > self.max_queued - waiting:
            raise Overloaded(
                f"the queue is full ({waiting} of {self.max_queued} jobs waiting); retry shortly", retryAfterMs=1000,
            )
        self._active[owner] += n
        self._reserved += n

    async def unreserve(self, owner: str | None, n: int) -> None:
        self._active[owner] -= n
        self._reserved -= n

    async def put(self, job: Job, prompt_ids: list[int], *, reserved: bool = True) -> int:
        owner_key = (job.priority, job.owner)
        tag = max(self._virtual_time.get(job.priority, 0), self._owner_tag.get(owner_key, 0)) + 1
        self._owner_tag[owner_key] = tag
        entry = _Entry((-job.priority, tag, next(self._order)), QueuedJob(job, prompt_ids))
        heapq.heappush(self._heap, entry)
        self._waiting[job.id] = entry
        if reserved:
            self._reserved -= 1
        else:
            self._active[job.owner] += 1
        self._work.set()
        return self._position(entry)

    async def claim(self, n: int) -> list[QueuedJob]:
        out = []
        while self._heap and len(out) < n:
            entry = heapq.heappop(self._heap)
            del self._waiting[entry.queued.job.id]
            self._virtual_time[entry.queued.job.priority] = entry.sort_key[1]
            out.append(entry.queued)
        return out

    async def remove(self, job_id: str) -> QueuedJob | None:
        entry = self._waiting.pop(job_id, None)
        if entry is None:
            return None
        # Out of the heap now: a submit-and-cancel loop must not grow it while the engine
        # is busy (the heap is at most max_queued long, so O(n) is fine).
        self._heap.remove(entry)
        heapq.heapify(self._heap)
        return entry.queued

    async def done(self, job: Job) -> None:
        self._active[job.owner] -= 1

    async def position(self, job_id: str) -> int | None:
        entry = self._waiting.get(job_id)
        return self._position(entry) if entry is not None else None

    def _position(self, entry: _Entry) -> int:
        return sum(1 for e in self._waiting.values() if e.sort_key < entry.sort_key)

    async def active(self, owner: str | None) -> int:
        return self._active[owner]

    async def depth(self) -> int:
        return len(self._waiting) + self._reserved

    async def wait_for_work(self) -> None:
        await self._work.wait()
        self._work.clear()
