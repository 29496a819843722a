"""Weight matrices prepacked for oneDNN, the CPU kernels torch ships (INFERQL_PACKED_WEIGHTS).

`F.linear` with a plain bfloat16 or float32 weight on the CPU takes torch's generic path,
which for the few rows of a decode step reads the weights at a fraction of the machine's
bandwidth. `torch.ops.mkldnn._reorder_linear_weight` lays a matrix out once in oneDNN's
blocked format and `torch.ops.mkldnn._linear_pointwise` multiplies by it: the same pair
torch.compile's CPU freezing pass emits for a linear layer, here called directly.

Measured on a 2-core AVX512-BF16 machine, 2 threads (`scripts/bench.py --kernels` times one
layer of the served model): SmolLM2-135M's four layer matmuls in bfloat16 1.7x faster at
1-4 rows, 1.35x at 16, 1.1-1.2x at 64-128; float32 about 1.7x at 1-16 rows. bfloat16 results are bit-identical to `F.linear`,
float32 ones within 2e-6. Only the CPU, in float32 or bfloat16, and only where a trial
multiplication at load agrees with `F.linear` (the ops are torch internals: a torch that
lacks or changes them falls back to plain weights).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(48, 32).to(dtype)
        x = torch.randn(3, 32).to(dtype)
        got = linear(x, pack(w))
        return bool(torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2))
    except Exception as exc:  # an op missing or changed in this torch
        log.info("oneDNN packed weights unavailable (%s): plain weights", exc)
        return False


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] (plain, contiguous) -> the same matrix in oneDNN's layout (opaque: no
    indexing or views; shape, numel and element_size still answer)."""
    return torch.ops.mkldnn._reorder_linear_weight(w)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a plain or a packed w."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)
