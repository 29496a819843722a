"""What the CPU offers, read once from /proc/cpuinfo (Linux; elsewhere nothing is assumed)."""

from __future__ import annotations

import functools


@functools.cache
def flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run natively (elsewhere they are emulated, slower
    than float32)."""
    return bool(flags() & {"avx512_bf16", "amx_bf16"})


def amx() -> bool:
    """AMX tiles for bfloat16: torch's CPU flash attention (SDPA) multiplies 16-bit blocks on them."""
    return "amx_bf16" in flags()
