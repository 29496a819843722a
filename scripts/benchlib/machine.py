"""The machine's own limits, measured before anything else computes: read bandwidth and GEMM
rate; and what one decode step of the engine reads and computes per token."""

from __future__ import annotations

import math
import time


def machine_limits(dtype, quick: bool) -> dict[str, float]:
    """Read bandwidth (GB/s: sum over a buffer far larger than the caches) and GEMM rate
    (GFLOP/s: 1024^3 matmuls) in float32 and in `dtype`; best of several tries, since the
    machine is shared and a slow try says more about the neighbours than about the machine."""
    import torch

    tries = 3 if quick else 8
    n = (64 if quick else 256) * 1024 * 1024 // 4
    buf = torch.rand(n)
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        buf.sum()
        best = max(best, n * 4 / (time.perf_counter() - t) / 1e9)
    del buf
    out = {"bandwidth_gbs": best}
    for dt in dict.fromkeys([torch.float32, dtype]):
        a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        rate = 0.0
        for _ in range(tries):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            rate = max(rate, 4 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9)
        out[f"gemm_{str(dt).removeprefix('torch.')}_gflops"] = rate
    return out


def weight_bytes_per_token(lm) -> tuple[int, int]:
    """(bytes of weights a decode step reads, multiply-adds per token) on the engine's path."""
    fast = lm.fast_weights()
    if fast is None:
        params = [p for n, p in lm.model.named_parameters() if "embed" not in n or lm.model.config.tie_word_embeddings]
        return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)
    tensors = [t for layer in fast.layers for t in layer if t is not None] + [fast.norm, fast.head]
    macs = sum(math.prod(t.shape) for t in tensors if len(t.shape) == 2)  # tensors and fbgemm.Float16
    # A 1-row step may read int8 copies of the matrices (INFERQL_INT8_SMALL_BATCH): count what it reads.
    return fast.step_weight_bytes(1), macs


def probe(settings, quick: bool) -> dict[str, float]:
    """machine_limits() in float32 and in the engine's default dtype here, printed."""
    from app.inference.cpu import native_bf16
    from app.inference.model import EngineOptions, pick_device, pick_dtype
    from app.inference.threads import in_passing_thread

    dtype = pick_dtype(EngineOptions.from_settings(settings).dtype, pick_device(settings.device))
    # before anything else computes; in a thread that ends with it (app/inference/threads.py)
    machine = in_passing_thread(machine_limits, dtype, quick=quick)
    print(f"CPU native bf16 (AVX512-BF16/AMX): {'yes' if native_bf16() else 'no'};"
          f" the engine's default dtype here: {str(dtype).removeprefix('torch.')}")
    print("machine: read bandwidth {:.1f} GB/s; GEMM {}".format(machine["bandwidth_gbs"], ", ".join(
        f"{k.removeprefix('gemm_').removesuffix('_gflops')} {v:.0f} GFLOP/s"
        for k, v in machine.items() if k.startswith("gemm_"))), flush=True)
    return machine
