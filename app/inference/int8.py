"""Weight-only int8 matrices for small decode batches (INFERQL_INT8_SMALL_BATCH).

A decode step with one or a few rows is a matrix-vector product: it reads every weight
once and does little arithmetic with it, so its time is the bytes it reads. int8 weights
with one float scale per output channel read half the bytes of bfloat16 ones;
`torch.ops.aten._weight_int8pack_mm` multiplies 16-bit activations by them directly (on a
CPU with AVX512-BF16 it ran 1.5-2.5x faster than a bfloat16 `F.linear` at 1 row). With more
rows the step becomes compute-bound and the bfloat16 GEMM wins, so the fast path keeps both
copies and picks by the number of rows (fastllama.py).

Scales are rounded to the activations' dtype (the op wants them so) before the weights are
divided by them, so the rounding of a scale does not bias its whole channel.

A float32 model's int8 copies multiply bfloat16 activations (`activations`): the op runs
float32 ones slowly, bfloat16 ones fast even without native support. On an AVX2-only CPU
(float32 weights) a whole 1-row decode step took 32.5 instead of 56.4 ms (`python -m
app.inference.int8`), as it reads a quarter of the bytes.

`auto` keeps the int8 copies for 1-row decode steps, without timing anything: int8 was the
faster at 1 row on every CPU measured (whole 1-row step 1.14x on an AVX512-BF16 CPU, 1.40x
with AMX, 1.73x for a float32 model on AVX2), and a choice timed at load differed between
two processes on one busy machine (int8 up to 1 row in one, up to 4 in the other), so
the same batch could decode differently in two replicas. `on` takes them up to 4 rows
(`python -m app.inference.int8` measures 1, 2 and 4 rows on a machine). On a GPU nothing
is kept.
"""

from __future__ import annotations

import time

import torch

ROWS_TRIED = (1, 2, 4)   # row counts `python -m app.inference.int8` compares
AUTO_ROWS = 1            # `auto`: int8 for 1-row decode steps
ON_ROWS = 4              # `on`: int8 for decode steps of up to this many rows


# torch's own binding where it has one: a call through the torch.ops packet cost 2-4 us more
# of Python per 1-row product (14.2-14.5 vs 16.4-19.1 us in two ad-hoc timings), ~120 per step.
_int8pack_mm = getattr(torch, "_weight_int8pack_mm", None) or torch.ops.aten._weight_int8pack_mm.default


def quantize(w: torch.Tensor, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (float32 master weights) -> (int8 [N, K], scales [N] in act_dtype)."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(act_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, q * scales[:, None], bias) for x [..., K], multiplied in the scales' dtype
    (x converted to it and the product back to x's dtype when they differ)."""
    lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if x.dtype == scales.dtype:  # a 16-bit model: no conversion calls on this hot path
        out = _int8pack_mm(rows, q, scales)
    else:
        out = _int8pack_mm(rows.to(scales.dtype), q, scales).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*lead, q.shape[0])


def activations(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype int8 copies multiply their activations in: the model's own when 16-bit,
    bfloat16 for a float32 model. The op runs float32 activations 5-20x slower than a float32
    GEMV, but bfloat16 ones fast even on a CPU without native bfloat16 (see the module's
    docstring for a whole step on AVX2). `linear` converts to it and back."""
    return torch.bfloat16 if model_dtype == torch.float32 else model_dtype


def usable(device: torch.device, model_dtype: torch.dtype) -> bool:
    """The op runs on CPU, for float32, bfloat16 and float16 models (see `activations`)."""
    return device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16, torch.float32)


def _compare_steps(model_dir, repeats: int) -> None:
    """Decode-step time at 1, 2 and 4 rows, the model's weights against int8, alternating in one
    process (a shared machine drifts; only ratios measured side by side mean anything)."""
    import statistics

    from .fastllama import FastLlama
    from .model import EngineOptions, load_model

    lm = load_model(model_dir, options=EngineOptions(int8_small_batch="on"))
    w = lm.fast_weights()
    print(f"weights {str(w.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads;"
          f" auto: int8 for decode steps of up to {AUTO_ROWS} row(s), on: up to {ON_ROWS}")
    fast = FastLlama(w, rows=max(ROWS_TRIED))
    prompt = lm.encode_chat([{"role": "user", "content": "Explain why the sky is blue."}])
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(fast.rows):
            fast.prefill(r, prompt, 0, logits=False)
        n = len(prompt)
        for _ in range(repeats):
            for rows in ROWS_TRIED:
                toks, pos = torch.full((rows,), 42), torch.full((rows,), n)
                for mode, limit in (("dense", 0), ("int8", ON_ROWS)):
                    w.int8_rows = limit
                    steps = []
                    for _ in range(8):
                        fast.lengths[:rows] = [n] * rows  # every step writes the same column
                        t = time.perf_counter()
                        fast.decode(toks, pos)
                        steps.append(time.perf_counter() - t)
                    times.setdefault((rows, mode), []).append(statistics.median(steps[2:]))
    for rows in ROWS_TRIED:
        a, b = times[(rows, "dense")], times[(rows, "int8")]
        ratios = sorted(x / y for x, y in zip(a, b))
        print(f"{rows} rows: {w.dtype} {statistics.median(a) * 1e3:.1f} ms, int8 {statistics.median(b) * 1e3:.1f} ms;"
              f" dense/int8 {statistics.median(ratios):.2f}x (repeats {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    from .weights import default_model_dir

    ap = argparse.ArgumentParser(description=_compare_steps.__doc__)
    ap.add_argument("--model", type=Path, default=default_model_dir(Path.home() / ".cache" / "inferql"))
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    _compare_steps(args.model, args.repeats)
