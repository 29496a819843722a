"""fbgemm's kernels for a float32 model on CPU (INFERQL_FP16_MATRICES): float16 matrices,
and the head's pass over the whole vocabulary in int8.

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
matrices (onednn.py), per matrix in an ad-hoc script: SmolLM2-135M's layer matrices
1.45-1.9x faster at 1 row, 1.1-1.35x at 16, about even at 128-512 (prefill); the
49152-row head 2.7x at 1 row, 1.2x at 16. A whole decode step: `scripts/bench.py
--kernels` (1.77x at 1 row, 1.43x at 16 there, before the int8 head). `auto` uses them
wherever they run (a float32 model on a CPU whose torch has fbgemm, a trial product
agreeing), without timing at load: a timing taken while another process loads a model
picked the float32 matrices in a server beside a bench that picked float16, and the two
then ran different paths.

The head (49152 x 576 for SmolLM2, a fifth of the weights) is the largest product of a
decode step, and only its top candidates need to be exact: fastllama.py recomputes the top
64 of every row in float32 and takes the logprobs against a logsumexp in which the other
~49k logits count only through their small share of the softmax mass. So with float16
matrices the head's full pass runs fbgemm's dynamic int8 product (`Int8Head`: int8 weights
per output channel, the activations quantized per call), 1.9x faster than float16 at 1 row
and 2.7x at 16 here (ad hoc). Each row is quantized on its own scale, so its logits do not depend on
what else is in the batch. The activations' quantization is most of the error (the final
hidden state has outlier channels, ~15x the median one's magnitude, which set the scale):
on the bench's prompts the mean |d logprob| went from 0.0007 (float16 head) to 0.0055, max
0.16, greedy agreement still 100 %.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Float16:
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


class Int8Head:
    """The head [vocab, K] for fbgemm's dynamic int8 product: approximate logits.

    fbgemm quantizes a call's activations with one range for the whole tensor, so a row's
    logits would depend on the other rows of the batch. Each row is divided by its own
    largest |value| (the product is linear: the logits are multiplied back), and a fixed
    anchor row [1, -1, 0, ...] goes along, so every call's range is exactly [-1, 1]: a row
    gets the same logits whatever shares its batch, as if quantized alone."""

    __slots__ = ("packed", "shape", "nbytes", "anchor")

    def __init__(self, w: torch.Tensor) -> None:
        w = w.detach().float().contiguous()
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        with warnings.catch_warnings():  # torch deprecates quantized tensors in favour of torchao
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.shape = tuple(w.shape)
        self.nbytes = w.numel() + w.shape[0] * 8
        self.anchor = torch.zeros(1, w.shape[1])
        self.anchor[0, :2] = torch.tensor([1.0, -1.0])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        size = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        # reduce_range: 7-bit activations, so fbgemm's int16 pair sums cannot saturate
        out = torch.ops.quantized.linear_dynamic(torch.cat([rows / size, self.anchor]), self.packed, True)
        out = out[:-1].mul_(size).view(*x.shape[:-1], self.shape[0])
        return out if bias is None else out + bias


def int8_head(head: torch.Tensor) -> Int8Head | None:
    """The head's int8 form, where it runs and a trial product agrees with the float32 one
    (else None: the head stays float16)."""
    try:
        int8 = Int8Head(head)
        # a fixed trial (the same answer in every process), within 10 % of the largest logit:
        # the int8 error is a few percent, a broken op's is not
        x = torch.randn(3, head.shape[1], generator=torch.Generator().manual_seed(0))
        exact = F.linear(x, head.detach().float())
        if (int8.linear(x) - exact).abs().max() <= 0.1 * exact.abs().max():
            return int8
        log.warning("fbgemm's int8 head disagrees with the float32 product: float16 kept")
    except Exception as exc:  # an op missing or changed in this torch
        log.info("fbgemm int8 head unavailable (%s): float16 kept", exc)
    return None


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """A float32 model on a CPU whose torch has fbgemm, where a trial product agrees with F.linear."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        w, x = torch.randn(48, 32), torch.randn(3, 32)
        got = Float16(w).linear(x)
        return bool(torch.allclose(got, F.linear(x, w.half().float()), rtol=1e-3, atol=1e-3))
    except Exception as exc:  # an op missing or changed in this torch
        log.info("fbgemm float16 matrices unavailable (%s)", exc)
        return False

