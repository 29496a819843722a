"""fbgemm's kernels for a float32 model (fbgemm.py, INFERQL_FP16_MATRICES): float16 matrices
and the head's full pass in int8.

The float16 products are the float32 products with float16-rounded weights; the int8 head's
logits are approximate, and the fast path recomputes each row's top candidates exactly. With
both, the real model keeps its greedy tokens and its logprobs stay close to the float32 eager
reference (closer than the bench's tolerance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.inference import fbgemm, native
from app.inference.fastllama import FastLlama
from app.inference.fidelity import measure
from app.inference.model import EngineOptions, load_model
from app.settings import Settings

from .test_fastpath import REAL_PROMPTS

CPU = torch.device("cpu")
needs_fbgemm = pytest.mark.skipif(not fbgemm.usable(CPU, torch.float32), reason="this torch has no fbgemm")


@needs_fbgemm
def test_a_product_is_the_float32_product_with_float16_weights():
    torch.manual_seed(0)
    w, bias = torch.randn(96, 64) * 0.1, torch.randn(96)
    m = fbgemm.Float16(w)
    assert m.shape == (96, 64) and m.nbytes == 96 * 64 * 2
    for x in (torch.randn(1, 64), torch.randn(17, 64), torch.randn(2, 3, 64)):
        got = m.linear(x)
        assert got.dtype == torch.float32 and got.shape == (*x.shape[:-1], 96)
        assert torch.allclose(got, F.linear(x, w.half().float()), atol=1e-5)
        assert not torch.allclose(got, F.linear(x, w), atol=1e-6)  # the weights really are float16
        assert torch.allclose(m.linear(x, bias), got + bias)


@needs_fbgemm
def test_the_int8_head_approximates_the_float32_product():
    torch.manual_seed(0)
    w = torch.randn(4096, 64) * 0.1
    head = fbgemm.Int8Head(w)
    assert head.shape == (4096, 64) and head.nbytes < 4096 * 64 * 2
    x = torch.randn(5, 64)
    got, exact = head.linear(x), F.linear(x, w)
    assert got.shape == (5, 4096) and got.dtype == torch.float32
    assert not torch.equal(got, exact)
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()
    # its top candidates hold the exact ones' best: what the fast path recomputes exactly
    assert (got.topk(16, dim=-1).indices == exact.argmax(-1)[:, None]).any(-1).all()


@needs_fbgemm
def test_the_int8_head_only_where_it_agrees_with_the_float32_product(monkeypatch):
    w = torch.randn(512, 64) * 0.1
    assert type(fbgemm.int8_head(w)) is fbgemm.Int8Head
    monkeypatch.setattr(fbgemm.Int8Head, "linear", lambda self, x, bias=None: torch.zeros(x.shape[0], 512) + 9)
    assert fbgemm.int8_head(w) is None

    def broken(self, x, bias=None):
        raise RuntimeError("no such op in this torch")

    monkeypatch.setattr(fbgemm.Int8Head, "linear", broken)
    assert fbgemm.int8_head(w) is None


@needs_fbgemm
def test_the_int8_head_is_batch_invariant():
    """Each row on its own scale: a row's logits are the same alone or beside others."""
    torch.manual_seed(0)
    head = fbgemm.Int8Head(torch.randn(2048, 64) * 0.1)
    x = torch.randn(8, 64)
    x[3] *= 10      # a row of larger values
    x[5, 7] = 40.0  # and an outlier channel
    assert torch.equal(head.linear(x), torch.cat([head.linear(x[i:i + 1]) for i in range(8)]))


def test_only_a_float32_model_on_cpu():
    assert not fbgemm.usable(CPU, torch.bfloat16)
    assert not fbgemm.usable(CPU, torch.float16)
    assert not fbgemm.usable(torch.device("cuda"), torch.float32)


@needs_fbgemm
def test_the_setting_switches_every_matrix(tiny_model_dir):
    on = load_model(tiny_model_dir, device="cpu",
                    options=EngineOptions(dtype="float32", fp16_matrices="on", int8_small_batch="off"))
    off = load_model(tiny_model_dir, device="cpu",
                     options=EngineOptions(dtype="float32", fp16_matrices="off", int8_small_batch="off"))
    w, w32 = on.fast_weights(), off.fast_weights()
    assert w.half and not w32.half and not w.exact_head and w32.exact_head
    assert all(type(m) is fbgemm.Float16 for layer in w.layers for m in (layer[1], layer[3], layer[5], layer[6]))
    assert type(w.head) in (fbgemm.Float16, fbgemm.Int8Head) and w.head32.dtype == torch.float32
    assert w.step_weight_bytes(1) <= w32.step_weight_bytes(1) // 2
    assert "float16" in on.matrix_format and "float16" not in off.matrix_format
    ids = on.encode_raw("The quick brown fox jumps over the lazy dog")
    outs = []
    with torch.inference_mode():
        for weights in (w, w32):
            fast = FastLlama(weights, rows=2)
            logits = [fast.prefill(0, ids[:6], 0)]
            fast.prefill(1, ids[:3], 0)
            for pos in range(6, len(ids)):
                logits.append(fast.decode(torch.tensor([ids[pos], ids[pos % 3]]), torch.tensor([pos, pos - 3]))[0])
            outs.append(torch.stack(logits))
    assert not torch.equal(outs[0], outs[1])
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()
    # each row's top candidates are recomputed in float32: close to the float32 path's logits
    top = outs[0].topk(16, dim=-1).indices
    assert torch.allclose(outs[0].gather(1, top), outs[1].gather(1, top), atol=1e-2)
    assert torch.allclose(outs[0], outs[1], atol=0.3)  # the rest: float16 matrices, maybe an int8 head


@needs_fbgemm
def test_auto_uses_them_for_a_float32_model_without_int8_copies(tiny_model_dir):
    """Not timed at load (a timing beside another busy process could pick differently in
    two processes on one machine): wherever fbgemm runs them; no int8 copies beside them
    through torch, but the native step's for steps of up to 4 rows where it runs."""
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="float32", native_step="off"))
    w = lm.fast_weights()
    assert w.half and type(w.head) is fbgemm.Int8Head
    assert w.int8_rows == 0 and not w.layers8
    assert "the head's full pass in int8" in lm.matrix_format
    w = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="float32")).fast_weights()
    if native.usable(w.device, w.dtype):
        assert w.half and w.native is not None and w.int8_rows == native.auto_rows(w.dtype)


def test_not_for_a_bfloat16_model(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="bfloat16", fp16_matrices="on"))
    assert not lm.fast_weights().half


def test_the_setting_reaches_engine_options(monkeypatch):
    for value in ("off", "on", "auto"):
        monkeypatch.setenv("INFERQL_FP16_MATRICES", value)
        assert EngineOptions.from_settings(Settings(_env_file=None)).fp16_matrices == value
    monkeypatch.delenv("INFERQL_FP16_MATRICES")
    assert Settings(_env_file=None).fp16_matrices == EngineOptions().fp16_matrices == "auto"


@needs_fbgemm
def test_float16_matrices_match_float32_eager_on_the_real_model(real_model_dir):
    lm = load_model(real_model_dir, device="cpu",
                    options=EngineOptions(dtype="float32", fp16_matrices="on", int8_small_batch="off"))
    prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    fid = measure(lm, prompts, tokens=12)
    assert fid.positions == 48
    # the bench's tolerance is agreement >= 97 %, mean |d logprob| <= 0.05; int8 copies of
    # every matrix measure ~0.03 there, float16 matrices ~0.001, with the int8 head ~0.007
    assert fid.agreement >= 0.97
    assert fid.mean_abs_dlogprob <= 0.02
