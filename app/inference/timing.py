"""Timing two ways of doing one thing on a shared machine: each one's best time over rounds
that alternate them, so drift and neighbours weigh on both alike (int8's choice at load,
the bench's kernels section)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of fn: the best of 3 runs of `reps` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def alternate(a: Callable[[], object], b: Callable[[], object], reps: int, rounds: int) -> tuple[float, float]:
    """(best time of a, best time of b) over `rounds` rounds that time a, then b."""
    ta = tb = float("inf")
    for _ in range(rounds):
        ta = min(ta, best_time(a, reps))
        tb = min(tb, best_time(b, reps))
    return ta, tb
