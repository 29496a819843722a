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

`auto` times the model's own matrices at load (about a second) at 1, 2 and 4 rows and
keeps the int8 copy for the row counts where it is clearly faster; where it is slower
(a GPU, or a CPU where the op is slow) nothing is kept.
"""

from __future__ import annotations

import logging
import time

import torch

from .timing import alternate

log = logging.getLogger(__name__)

ROWS_TRIED = (1, 2, 4)   # row counts `auto` times
ON_ROWS = 4              # `on`: int8 for decode steps of up to this many rows
# `auto` keeps a row count where int8 is at least this much faster. Against the oneDNN-packed
# 16-bit matrices, 1-row timings at load ranged 1.09-1.35x (a whole 1-row decode step ~1.14x):
# a 1.1 bar was missed by noise in about one start in four, and a server and the bench's
# engine on one machine then ran different paths.
MIN_GAIN = 1.05


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
        out = torch.ops.aten._weight_int8pack_mm(rows, q, scales)
    else:
        out = torch.ops.aten._weight_int8pack_mm(rows.to(scales.dtype), q, scales).to(x.dtype)
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


@torch.inference_mode()
def measure_rows(mats: list[tuple[object, torch.Tensor, torch.Tensor]], model_dtype: torch.dtype, dense,
                 rows: tuple[int, ...] = ROWS_TRIED, budget_s: float = 1.0) -> tuple[int, dict[int, float]]:
    """mats: (the model's weight in the form the fast path multiplies by, int8 weight, scales) of
    one layer; dense(x, w): that product (fastllama.dense). Returns (the largest row count
    up to which int8 is at least MIN_GAIN x faster at every count tried, 0 if not even at 1;
    {rows: dense time / int8 time})."""
    t_end = time.perf_counter() + budget_s
    ratios: dict[int, float] = {}
    keep = 0
    for m in rows:
        xs = {q.shape[1]: torch.randn(m, q.shape[1], dtype=model_dtype) for _, q, _ in mats}
        big = lambda: [dense(xs[q.shape[1]], w) for w, q, _ in mats]  # noqa: E731
        small = lambda: [linear(xs[q.shape[1]], q, s) for _, q, s in mats]  # noqa: E731
        a, b = alternate(big, small, reps=8, rounds=7)
        ratios[m] = a / b
        if ratios[m] < MIN_GAIN:
            break
        keep = m
        if time.perf_counter() > t_end:
            break
    return keep, ratios


def _compare_steps(model_dir, repeats: int) -> None:
    """Decode-step time at 1, 2 and 4 rows, the model's weights against int8, alternating in one
    process (a shared machine drifts; only ratios measured side by side mean anything)."""
    import statistics

    from .fastllama import FastLlama
    from .model import EngineOptions, load_model

    lm = load_model(model_dir, options=EngineOptions(int8_small_batch="on"))
    w = lm.fast_weights()
    print(f"weights {str(w.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads;"
          f" auto here: int8 up to {_auto_rows(w)} rows")
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


def _auto_rows(w) -> int:
    from .fastllama import dense

    _, wqkv, _, wo, _, wgu, wd = w.layers[0]
    return measure_rows([(m, *q8) for m, q8 in zip((wqkv, wo, wgu, wd), w.layers8[0])], w.dtype, dense)[0]


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    from .weights import default_model_dir

    ap = argparse.ArgumentParser(description=_compare_steps.__doc__)
    ap.add_argument("--model", type=Path, default=default_model_dir(Path.home() / ".cache" / "inferql"))
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    _compare_steps(args.model, args.repeats)
