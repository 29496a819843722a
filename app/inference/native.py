"""A decode step of a few rows in one native call (INFERQL_NATIVE_STEP; native/decode_step.c).

At one row, SmolLM2-135M's decode step through torch is ~1000 small ops: each pays Python,
ATen's dispatch and an OpenMP fork/join, and together they take as long as the matrix
products. decode_step.c runs the whole step (every layer, the final norm, the head) inside
one OpenMP parallel region over the int8 copies (int8.py), each product's input quantized per
row to 15 bits (on AMX tiles: rounded to bfloat16, a bfloat16 model's steps of 8+ rows) and
everything else in float32, and writes the engine's own KV cache in place.
fastllama.FastLlama.decode takes it for steps of up to `FastWeights.int8_rows` rows (16, or
64 on AMX tiles); bigger steps, where `groups_pay`, as one call per that many rows;
prefills and the other bigger steps stay on torch.

The C file is compiled at first use with the machine's C compiler (`cc -O3 -march=native
-fopenmp`, ~1 s) into ~/.cache/inferql/native (or $XDG_CACHE_HOME), named by a hash of the
source, the flags and the CPU's flags, and loaded with ctypes, which releases the GIL for the
call. torch is imported first, so the library's libgomp is torch's: one OpenMP thread pool
per thread, as before (threads.py). Without a compiler, `auto` keeps the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import POINTER, c_float, c_int, c_void_p
from pathlib import Path

import torch

from . import cpu

SOURCE = Path(__file__).with_name("native") / "decode_step.c"
# -fno-tree-pre: with gcc's partial redundancy elimination on, the blocked products' inner
# loop (block_group) kept copies of its accumulators and spilled some to the stack: AVX2, 6
# rows, 48 instructions per pair of inputs, 18 of them stack accesses, against 36 and none
# without it (the AVX512 build, 8 rows: 62 with 4 stack accesses and 32 register copies,
# against 30; read from gcc 12's assembly). A whole 16-row step on an
# AVX2-only EPYC: 71.2 -> 60.3 ms, 12 rows 56.7 -> 46.5, 1 row unchanged (ad hoc, SmolLM2-135M).
FLAGS = ("-O3", "-fno-tree-pre", "-fopenmp", "-shared", "-fPIC")  # and -march: the machine's own by default
# The step's rows: up to 16 (the int16 products), up to 64 where its products run on AMX's
# bfloat16 tiles (max_rows). `auto` (INFERQL_INT8_SMALL_BATCH) with this step: the int8 copies
# for every decode step it takes, wherever it runs (an x86-64 CPU with AVX2, `usable`). From a
# few rows on (blocked_from) the products are the blocked ones, in AVX512 or AVX2 registers,
# or on the tiles (amx_from).
# SmolLM2-135M, whole steps natively against the matrices torch's bigger steps take
# (`bench.py --kernels` prints them): on an AVX512-BF16 CPU against the packed bfloat16
# matrices, 1 row 4.4 vs 20.7 ms, 4 rows 9.2 vs 22.0, 8 rows 14.1 vs 25.6, 16 rows 25.4 vs
# 34.3; on an AVX2-only EPYC against fbgemm's float16 matrices, 4 rows 21.0 vs 49.1 ms, 8
# rows 35.9 vs 65.6, 16 rows 60.3 vs 79.5 (ad hoc).


def max_rows(dtype: torch.dtype, march: str = "native") -> int:
    """The most rows a step of a `dtype` model takes here: 64 where the build's products run on
    AMX tiles (bfloat16 activations: for a bfloat16 model only), else 16."""
    return library(march).inferql_max_rows(int(dtype == torch.bfloat16))


def auto_rows(dtype: torch.dtype) -> int:
    """The rows `auto` gives the native step: all it takes (max_rows)."""
    return max_rows(dtype)


def groups_pay(dtype: torch.dtype) -> bool:
    """Whether `auto` runs steps of more rows than the native step takes as several native calls
    (FastWeights.native_groups) rather than through torch's dense matrices: for a
    bfloat16 model on a CPU with AVX512-BF16 and no AMX (with AMX the step takes 64 rows on the
    tiles). There, whole steps (ad hoc, AMD EPYC, 60 cached positions): 24 rows 27.2 ms dense
    vs 18.4 in calls of 16 + 8, 32 rows 32.7 vs 22.0, 48 rows 47.4 vs 33.1, 64 rows 53.8 vs
    43.5, the same greedy tokens. Not measured elsewhere, so not taken there."""
    return dtype == torch.bfloat16 and cpu.native_bf16() and not cpu.amx()


def amx_from(march: str = "native") -> int:
    """From how many rows the build's products run on AMX tiles, for a bfloat16 model (0: never
    here: no AMX in the build, or the kernel refused the tiles' state)."""
    return library(march).inferql_amx_from()


def on_tiles(rows: int, dtype: torch.dtype, march: str = "native") -> bool:
    """Whether a step of `rows` rows of a `dtype` model multiplies on AMX tiles here (decode_step.c's
    on_tiles)."""
    return dtype == torch.bfloat16 and 0 < amx_from(march) <= rows


def blocked(q: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The first outputs of int8 weights q [n, k] in blocks of 32 (decode_step.c's Mat.wb), and
    how many outputs they cover; (None, 0) when there is no whole block or k is odd."""
    n, k = q.shape
    nb = n - n % 32
    if nb == 0 or k % 2:
        return None, 0
    return q[:nb].reshape(nb // 32, 2, 16, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous(), nb


class _Mat(ctypes.Structure):
    _fields_ = [("w", c_void_p), ("scale", c_void_p), ("bias", c_void_p), ("n", c_int), ("k", c_int),
                ("wb", c_void_p), ("nb", c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", c_void_p), ("ln2", c_void_p), ("qkv", _Mat), ("o", _Mat), ("gu", _Mat), ("down", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [(name, c_int) for name in ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab",
                                           "max_len")] + \
               [("eps", c_float), ("sm_scale", c_float), ("layers", POINTER(_Layer)), ("norm", c_void_p),
                ("head", _Mat)]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inferql" / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(cache_dir: Path | None = None, march: str = "native") -> Path:
    """The compiled library's path, compiling it unless this source, these flags and this CPU
    already have one. march: the instruction set (`native`: this CPU's; the tests also build
    `x86-64-v3`, AVX2 only, and `x86-64`, no vectors, to run the other code paths). Raises
    RuntimeError (no compiler, or it failed)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc or $CC)")
    flags = (*FLAGS, f"-march={march}")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), platform.machine().encode(),
                                     " ".join(sorted(cpu.flags())).encode()])).hexdigest()[:16]
    folder = cache_dir or _cache_dir()
    target = folder / f"decode_step-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # compiled beside the target, then renamed: two processes building at once both succeed
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library(march: str = "native") -> ctypes.CDLL:
    """The loaded library (built first if need be). Raises RuntimeError if it cannot be."""
    lib = ctypes.CDLL(str(build(march=march)))
    lib.inferql_decode_step.argtypes = [POINTER(_Model), c_int, c_void_p, c_void_p, c_void_p, c_int, c_int,
                                        c_void_p, c_void_p, c_void_p, c_void_p, c_int]
    lib.inferql_decode_step.restype = c_int
    lib.inferql_gemv.argtypes = [c_void_p, c_void_p, c_void_p, c_int, c_int, c_void_p, c_int, c_int, c_void_p,
                                 c_void_p, c_int, c_int]
    lib.inferql_gemv.restype = c_int
    lib.inferql_blocked_from.argtypes = []
    lib.inferql_blocked_from.restype = c_int
    lib.inferql_max_rows.argtypes = [c_int]
    lib.inferql_max_rows.restype = c_int
    lib.inferql_amx_from.argtypes = []
    lib.inferql_amx_from.restype = c_int
    return lib


def blocked_from(march: str = "native") -> int:
    """From how many rows the build for `march` takes the blocked products (decode_step.c's
    BLOCKED_FROM: 5 with AVX512, where the dot products hold up to 4 rows; 2 with AVX2 alone,
    where a 2-row product of a layer's matrices was already ~1.2-1.7x faster blocked, ad hoc)."""
    return library(march).inferql_blocked_from()


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """The step runs on an x86-64 CPU with AVX2 and FMA, with a bfloat16 or float32 KV cache.
    Its products and attention are written for AVX2 and AVX512; built without them (the plain
    loops) a 1-row step took 70 ms against 24 ms through torch (`-march=x86-64`, ad hoc), so
    such a CPU keeps torch (and so would another architecture, not measured)."""
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
            and platform.machine() == "x86_64" and {"avx2", "fma"} <= cpu.flags())


def gemv(q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
         march: str = "native", with_blocks: bool = False, bf16: bool = False) -> torch.Tensor:
    """x [B, K] float32 @ (q * scales[:, None]).T (+ bias): one product through the library;
    with_blocks: given the blocked copy too (taken from blocked_from rows); bf16: as for a
    bfloat16 model (on AMX tiles from amx_from rows, the activations in bfloat16)."""
    B, K = x.shape
    N = q.shape[0]
    if B > max_rows(torch.bfloat16 if bf16 else torch.float32, march) or q.shape[1] != K:
        raise ValueError(f"gemv of {B} rows against {tuple(q.shape)}")
    x, s = x.float().contiguous(), scales.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    wb, nb = blocked(q) if with_blocks else (None, 0)
    y = torch.empty(B, N)
    rc = library(march).inferql_gemv(q.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(), N, K,
                                     None if wb is None else wb.data_ptr(), nb, B, x.data_ptr(), y.data_ptr(),
                                     torch.get_num_threads(), int(bf16))
    if rc:
        raise RuntimeError(f"native gemv failed ({rc})")
    return y


class NativeStep:
    """FastWeights' int8 copies, norms and head described for decode_step.c (the tensors it
    points at are kept here)."""

    def __init__(self, weights, march: str = "native") -> None:
        self.lib = library(march)
        self._keep: list[torch.Tensor] = []
        w = weights
        # the blocked copies (as many bytes again) only where steps that take them run here
        self._blocks = w.int8_rows >= blocked_from(march) or on_tiles(w.int8_rows, w.dtype, march)
        layers = (_Layer * w.n_layers)()
        for li, (dense, int8s) in enumerate(zip(w.layers, w.layers8)):
            ln1, _, bqkv, _, ln2, _, _ = dense
            qkv8, o8, gu8, d8 = int8s
            layers[li] = _Layer(self._ptr(ln1), self._ptr(ln2), self._mat(*qkv8, bqkv), self._mat(*o8),
                                self._mat(*gu8), self._mat(*d8))
        self._layers = layers
        inter = w.layers8[0][3][0].shape[1]
        self.model = _Model(w.n_layers, w.hidden, w.n_heads, w.n_kv, w.head_dim, inter, w.vocab, w.max_len,
                            w.eps, w.sm_scale, layers, self._ptr(w.norm), self._mat(*w.head8))
        self.cache_bf16 = int(w.dtype == torch.bfloat16)
        self.cos, self.sin_signed = w.cos, w.sin_signed

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _mat(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> _Mat:
        self._keep.append(q)
        wb, nb = blocked(q) if self._blocks else (None, 0)
        if wb is not None:
            self._keep.append(wb)
        return _Mat(q.data_ptr(), self._ptr(scales), None if bias is None else self._ptr(bias), q.shape[0], q.shape[1],
                    None if wb is None else wb.data_ptr(), nb)

    def step(self, h: torch.Tensor, k_ptrs, v_ptrs, capacity: int, positions: list[int],
             logits: torch.Tensor) -> None:
        """Run the step: h [B, hidden] float32 (the embeddings in, the final-normed hidden
        states out), logits [B, vocab] float32 (filled). k_ptrs, v_ptrs: per layer, the data
        of the cache tensors [rows, kv_heads, capacity, head_dim]."""
        B = h.shape[0]
        pos = (c_int * B)(*positions)
        rc = self.lib.inferql_decode_step(ctypes.byref(self.model), B, h.data_ptr(), k_ptrs, v_ptrs, self.cache_bf16,
                                          capacity, pos, self.cos.data_ptr(), self.sin_signed.data_ptr(),
                                          logits.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"native decode step failed ({rc}): {B} rows at {positions}, capacity {capacity}")
