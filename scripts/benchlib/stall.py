"""The decode stall a long prompt causes: running streams' gaps between tokens while a
2k-token prompt is prefilled, with the prompt fed whole (before chunked prefill) and in
chunks (INFERQL_PREFILL_CHUNK, the default)."""

from __future__ import annotations

import asyncio
import statistics
import time

from .streams import PROMPTS

LONG_TEXT = ("The history of the lighthouse begins with fires lit on hills to guide ships home. "
             "Later, towers of stone held lamps of oil, and then lenses that bent the light into beams. ")


def long_prompt(lm, tokens: int) -> list[int]:
    ids: list[int] = []
    text = LONG_TEXT
    while len(ids) < tokens:
        ids = lm.tokenizer.encode(text, add_special_tokens=False)
        text += LONG_TEXT
    return ids[:tokens]


async def _one(lm, chunk: int, streams: int, prompt_tokens: int, max_batch: int) -> dict:
    from app.inference.engine import Engine
    from app.inference.types import Finished, SamplingParams, TokenStep

    engine = Engine(lm, max_batch_size=max_batch, prefill_chunk=chunk)
    engine.start()
    try:
        params = SamplingParams(max_tokens=10_000, temperature=0.0)
        handles = [engine.submit(lm.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]), params)
                   for i in range(streams)]
        gaps: list[tuple[float, float]] = []  # (arrival, gap since the stream's previous token)
        stop = asyncio.Event()

        async def follow(handle) -> None:
            last = None
            async for out in handle:
                if isinstance(out, TokenStep):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now
                    if stop.is_set():
                        handle.cancel()
                elif isinstance(out, Finished):
                    return

        tasks = [asyncio.create_task(follow(h)) for h in handles]
        await asyncio.sleep(3.0)  # the streams are decoding at a steady rate
        t_long = time.perf_counter()
        long = engine.submit(long_prompt(lm, prompt_tokens), SamplingParams(max_tokens=1, temperature=0.0))
        first = None
        async for out in long:
            if isinstance(out, TokenStep) and first is None:
                first = time.perf_counter()
            if isinstance(out, Finished):
                break
        t_done = time.perf_counter()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await engine.stop()
    before = [g for at, g in gaps if at < t_long]
    during = [g for at, g in gaps if t_long <= at <= t_done + 0.5]
    return {
        "chunk": chunk,
        "steady_ms": statistics.median(before) * 1000 if before else float("nan"),
        "max_gap_ms": max(during) * 1000 if during else float("nan"),
        "p50_gap_ms": statistics.median(during) * 1000 if during else float("nan"),
        "prefill_s": (first or t_done) - t_long,
    }


async def stall_section(lm, *, streams: int, prompt_tokens: int, chunk: int, max_batch: int) -> list[dict]:
    print(f"\nstall: {streams} streams decoding (direct engine), then one {prompt_tokens}-token prompt arrives;"
          " the running streams' largest gap between two tokens while it is prefilled", flush=True)
    rows = []
    for c in (prompt_tokens * 4, chunk):  # whole (no chunking), then chunked
        row = await _one(lm, c, streams, prompt_tokens, max_batch)
        label = "whole prompt (unchunked)" if c >= prompt_tokens else f"chunks of {c} tokens"
        print(f"  {label:<25} gap before it p50 {row['steady_ms']:5.1f} ms; during its prefill: largest"
              f" {row['max_gap_ms']:7.1f} ms (p50 {row['p50_gap_ms']:6.1f} ms)"
              f"   the long prompt's TTFT {row['prefill_s'] * 1000:8.1f} ms", flush=True)
        rows.append(row)
    return rows
