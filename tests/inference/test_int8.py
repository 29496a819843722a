"""Weight-only int8 for small decode batches (int8.py, INFERQL_INT8_SMALL_BATCH).

The tiny model checks the plumbing: which steps take the int8 copies, shapes, that the
setting forces the path on and off. The real model checks fidelity against the float32
eager reference (the bench's tolerance: agreement >= 97 %, mean |d logprob| <= 0.05).
"""

from __future__ import annotations

import time

import pytest
import torch

from app.inference import int8, native
from app.inference.fastllama import FastLlama
from app.inference.fidelity import measure
from app.inference.model import EngineOptions, load_model
from app.settings import Settings

from .test_fastpath import REAL_PROMPTS


def test_quantize_rounds_each_channel_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.linspace(0.1, 3.0, 48)[:, None]
    for act in (torch.float32, torch.bfloat16):
        q, s = int8.quantize(w, act)
        assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == act and s.shape == (48,)
        err = (q.float() * s.float()[:, None] - w).abs()
        assert (err <= s.float()[:, None] * 0.5 + 1e-6).all()
        x = torch.randn(3, 64).to(act)
        assert int8.linear(x, q, s).shape == (3, 48)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_setting_forces_the_path_on_and_off(tiny_model_dir, dtype):
    # float16 matrices off: int8 against the float32 matrices it stands in for where bfloat16 is not native
    # (the torch op's path: test_native.py covers the native step)
    off = load_model(tiny_model_dir, device="cpu",
                     options=EngineOptions(dtype=dtype, int8_small_batch="off", fp16_matrices="off"))
    on = load_model(tiny_model_dir, device="cpu",
                    options=EngineOptions(dtype=dtype, int8_small_batch="on", fp16_matrices="off", native_step="off"))
    assert off.fast_weights().int8_rows == 0 and not off.fast_weights().layers8
    w = on.fast_weights()
    assert w.int8_rows == int8.ON_ROWS and len(w.layers8) == w.n_layers and w.head8 is not None
    assert w.step_weight_bytes(1) < off.fast_weights().step_weight_bytes(1) == w.step_weight_bytes(int8.ON_ROWS + 1)
    ids = on.encode_raw("The quick brown fox jumps over the lazy dog")
    rows = int8.ON_ROWS + 1
    with torch.inference_mode():
        a, b = FastLlama(off.fast_weights(), rows), FastLlama(w, rows)
        for fast in (a, b):
            for r in range(rows):
                fast.prefill(r, ids[:5 + r], 0, logits=False)
        for batch in (1, int8.ON_ROWS, rows):
            toks = torch.tensor(ids[-batch:])
            pos = torch.tensor([5 + r for r in range(batch)])
            for fast in (a, b):
                fast.lengths[:rows] = [5 + r for r in range(rows)]
            ref, got = a.decode(toks, pos), b.decode(toks, pos)
            assert got.shape == ref.shape == (batch, w.vocab) and got.dtype == torch.float32
            if batch > int8.ON_ROWS:  # a bigger step runs the 16-bit weights (prefills always
                assert torch.equal(got, ref)  # do, so both caches hold the same keys)
            else:
                assert not torch.equal(got, ref)
                assert torch.allclose(got, ref, atol=0.05)
                assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_a_float32_model_multiplies_its_int8_copies_in_bfloat16(tiny_model_dir):
    # the op runs float32 activations many times slower than bfloat16 ones, even without
    # native bfloat16: the copies' scales (and so the products) are bfloat16
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="float32", int8_small_batch="on",
                                                                        native_step="off"))
    w = lm.fast_weights()
    assert all(s.dtype == torch.bfloat16 for layer in w.layers8 for _, s in layer) and w.head8[1].dtype == torch.bfloat16
    q, s = w.layers8[0][0]
    x = torch.randn(2, q.shape[1])
    out = int8.linear(x, q, s)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x @ (q.float() * s.float()[:, None]).T, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("natively", [False, True])
def test_auto_takes_int8_for_small_steps_without_timing(monkeypatch, tiny_model_dir, dtype, natively):
    """A fixed rule, so every process on a machine (replicas, the bench's engine) decides alike:
    1-row steps through torch, up to 4 rows with the native step."""
    def no_timing(*args, **kwargs):
        raise AssertionError("auto must not time anything")

    monkeypatch.setattr(time, "perf_counter", no_timing)
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(
        dtype=dtype, int8_small_batch="auto", fp16_matrices="off", native_step="auto" if natively else "off"))
    w = lm.fast_weights()
    monkeypatch.undo()
    natively = natively and native.usable(lm.device, lm.dtype)  # an x86-64 CPU with AVX2
    rows = native.auto_rows(lm.dtype) if natively else int8.AUTO_ROWS
    assert (w.native is not None) == natively and w.int8_rows == rows and len(w.layers8) == w.n_layers
    assert f"int8 copies for decode steps of up to {rows} rows" in lm.matrix_format


def test_the_setting_reaches_engine_options(monkeypatch):
    monkeypatch.setenv("INFERQL_INT8_SMALL_BATCH", "off")
    assert EngineOptions.from_settings(Settings(_env_file=None)).int8_small_batch == "off"
    monkeypatch.setenv("INFERQL_INT8_SMALL_BATCH", "on")
    assert EngineOptions.from_settings(Settings(_env_file=None)).int8_small_batch == "on"
    monkeypatch.delenv("INFERQL_INT8_SMALL_BATCH")
    assert Settings(_env_file=None).int8_small_batch == EngineOptions().int8_small_batch


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("step", ["auto", "off"])  # the native step, torch's int8 op
def test_int8_matches_float32_eager_on_the_real_model(real_model_dir, dtype, step):
    lm = load_model(real_model_dir, device="cpu", options=EngineOptions(dtype=dtype, int8_small_batch="on",
                                                                        native_step=step))
    assert lm.fast_weights().int8_rows >= 1  # measure() decodes one row: every step runs int8
    natively = step == "auto" and native.usable(lm.device, lm.dtype)
    assert (lm.fast_weights().native is not None) == natively
    prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    fid = measure(lm, prompts, tokens=12)
    assert fid.positions == 48
    assert fid.agreement >= 0.97
    assert fid.mean_abs_dlogprob <= 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_batch_of_eight_matches_float32_eager_on_the_real_model(real_model_dir, dtype):
    """The prompts decoded together, as concurrent streams are: 8-row steps, which take the
    blocked products (and on a CPU with AMX, a bfloat16 model's tiles, bfloat16 activations)."""
    lm = load_model(real_model_dir, device="cpu", options=EngineOptions(dtype=dtype))
    prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    prompts += [lm.encode_chat([{"role": "user", "content": p + " Answer briefly."}]) for p in REAL_PROMPTS]
    fid = measure(lm, prompts, tokens=12, batched=True)
    assert fid.positions == 96
    assert fid.agreement >= 0.97
    assert fid.mean_abs_dlogprob <= 0.05
