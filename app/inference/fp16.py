"""float16 matrices for a float32 model on CPU, multiplied by fbgemm (INFERQL_FP16_MATRICES).

On a CPU without native bfloat16 (AVX2 only, say) the fast path runs a float32 model, and a
decode step reads 4 bytes per weight. fbgemm, which torch ships for its dynamic
quantization, has a GEMM that keeps the matrix in float16 and multiplies float32
activations by it, converting each block of weights to float32 in registers (F16C, on every
AVX2 CPU) and accumulating in float32: half the bytes read, the arithmetic and the
activations still float32. `torch.ops.quantized.linear_prepack_fp16` lays a matrix out
once at load; `linear_dynamic_fp16` multiplies by it.

float16 keeps 11 bits of mantissa (bfloat16 8): a weight's relative rounding is below
5e-4, so the logits move by a few hundredths at most and greedy choices almost never;
the head's top candidates are still recomputed from the float32 weights (fastllama.py).

Measured on a 2-core AVX2-only AMD EPYC, 2 threads, against the oneDNN-packed float32
matrices (onednn.py): SmolLM2-135M's layer matrices 1.45-1.9x faster at 1 row, 1.1-1.35x
at 16, about even at 128-512 (prefill); the 49152-row head 2.7x at 1 row, 1.2x at 16
(`python -m app.inference.fp16` times one layer by rows). `auto` times one layer at load
and keeps float16 only where it is faster at 1 and at 16 rows.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .timing import alternate

log = logging.getLogger(__name__)

MIN_GAIN_1ROW = 1.1   # `auto`: at least this much faster at 1 row (bandwidth-bound steps) ...
MIN_GAIN_16ROWS = 1.0  # ... and not slower at 16 (compute-bound steps)


class Matrix:
    """One weight matrix [N, K] in fbgemm's float16 layout (opaque: only multiplied by)."""

    __slots__ = ("packed", "shape", "nbytes")

    def __init__(self, w: torch.Tensor) -> None:
        w = w.detach().float().contiguous()
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        self.shape = tuple(w.shape)
        self.nbytes = w.numel() * 2

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] float32 @ w.T (+ bias) -> [..., N] float32."""
        out = torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return out if bias is None else out + bias


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """A float32 model on a CPU whose torch has fbgemm, where a trial product agrees with F.linear."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        w, x = torch.randn(48, 32), torch.randn(3, 32)
        got = Matrix(w).linear(x)
        return bool(torch.allclose(got, F.linear(x, w.half().float()), rtol=1e-3, atol=1e-3))
    except Exception as exc:  # an op missing or changed in this torch
        log.info("fbgemm float16 matrices unavailable (%s)", exc)
        return False


@torch.inference_mode()
def measure(mats: list[torch.Tensor], dense, rows: tuple[int, ...] = (1, 16)) -> dict[int, float]:
    """mats: one layer's float32 matrices [N, K]; dense(x, m): the product the model would
    otherwise take with m (its packed float32 form). Returns {rows: dense time / float16 time}."""
    halves = [Matrix(m) for m in mats]
    ratios = {}
    for n in rows:
        xs = {m.shape[1]: torch.randn(n, m.shape[1]) for m in mats}
        a, b = alternate(lambda: [dense(xs[m.shape[1]], m) for m in mats],
                         lambda: [h.linear(xs[h.shape[1]]) for h in halves], reps=8, rounds=7)
        ratios[n] = a / b
    return ratios


def worth_it(ratios: dict[int, float]) -> bool:
    return ratios.get(1, 0.0) >= MIN_GAIN_1ROW and ratios.get(16, 0.0) >= MIN_GAIN_16ROWS


if __name__ == "__main__":
    import argparse

    from . import onednn
    from .threads import in_passing_thread

    ap = argparse.ArgumentParser(description="One layer's matrices of SmolLM2-135M's shapes (random weights), "
                                             "oneDNN-packed float32 against fbgemm float16, by rows.")
    ap.add_argument("--rows", default="1,4,16,64,128")
    args = ap.parse_args()

    def run() -> None:
        shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
        mats = [torch.randn(n, k) * 0.05 for n, k in shapes]
        packs = {id(m): onednn.pack(m) for m in mats} if onednn.usable(torch.device("cpu"), torch.float32) else {}
        dense = lambda x, m: onednn.linear(x, packs.get(id(m), m))  # noqa: E731
        ratios = measure(mats, dense, tuple(int(r) for r in args.rows.split(",")))
        print(f"{torch.get_num_threads()} threads; one layer's matrices, dense float32 time / float16 time:")
        for n, r in ratios.items():
            print(f"  {n:4d} rows: {r:.2f}x")

    in_passing_thread(run)
