"""Which threads run torch: the engine's, and threads that end when their work does.

torch's CPU ops parallelise with OpenMP (libgomp on Linux), and libgomp gives every thread
that opens a parallel region a pool of worker threads of its own, kept until that thread
ends. Once the pools together hold more threads than the machine has cores, libgomp's
workers stop spin-waiting between regions (its spin count drops to 100) and sleep on a
futex instead, so every parallel region pays a wake-up: a decode step opens about a
thousand. Measured on a 2-core machine, SmolLM2-135M, 2 torch threads (`scripts/bench.py
--kernels`): a decode step took 1.7-1.8x longer beside a second thread's pool (1 row 45 vs
26 ms, 16 rows 68 vs 40 ms).

So the model is loaded, and any other torch work outside the engine is done, in a thread
that ends with it (`in_passing_thread`), and the long-lived threads (the event loop's, the
executor's) run no torch op that parallelises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a new thread that ends when it returns (its OpenMP pool with
    it); its result, or its exception raised here."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=body, name="inferql-torch-once", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["result"]  # type: ignore[return-value]
