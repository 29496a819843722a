"""The fast path's fidelity: over 20 fixed prompts, greedy agreement and mean |d logprob|
against a float32 eager reference (app/inference/fidelity.py)."""

from __future__ import annotations

import asyncio
import time

from .streams import PROMPTS

FIDELITY_PROMPTS = PROMPTS + [
    "What is the capital of France?",
    "List three uses of copper.",
    "Translate 'good morning' into French and Spanish.",
    "Why do leaves change colour in autumn?",
    "Write a haiku about the sea.",
    "How does a refrigerator keep food cold?",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Give three tips for a job interview.",
    "What causes the seasons on Earth?",
    "Explain what a prime number is.",
    "Suggest a name for a friendly robot.",
]


async def fidelity_section(lm, tokens: int, smoke: bool):
    """The fidelity measure, the prompts one at a time and all together (steps of 20 rows), or
    None when skipped (tokens 0, or the model runs the HF forward)."""
    if tokens <= 0 or lm.fast_weights() is None:
        return None
    from app.inference.fidelity import measure, reference_greedy
    from app.inference.threads import in_passing_thread

    n = 2 if smoke else len(FIDELITY_PROMPTS)
    prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in FIDELITY_PROMPTS[:n]]

    def both():
        refs = [reference_greedy(lm.model, prompt, tokens) for prompt in prompts]
        return {rows: measure(lm, prompts, tokens, batched=rows > 1, refs=refs) for rows in (1, n)}

    t0 = time.perf_counter()
    fidelity = await asyncio.to_thread(in_passing_thread, both)  # see threads.py
    print(f"fidelity: {n} prompts x {tokens} tokens against float32 eager, one at a time and as one batch"
          f" in {time.perf_counter() - t0:.1f}s", flush=True)
    return fidelity
