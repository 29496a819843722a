"""The fast path (fastllama.py) against the Hugging Face forward it replaces.

float32: the same logits (to float rounding) for prefill, chunked prefill, decode and a
reused prefix. bfloat16 (the default where the CPU has native bf16): on the real model,
the same greedy tokens as the float32 eager reference on fixed prompts, and logprobs
within the bench's tolerance (agreement >= 97 %, mean |d logprob| <= 0.05).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.inference import onednn
from app.inference.engine import Engine
from app.inference.fastllama import FastLlama
from app.inference.fidelity import measure
from app.inference.model import EngineOptions, load_model
from app.inference.types import Finished, SamplingParams, TokenStep


@pytest.fixture(scope="module")
def tiny32(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu",
                      options=EngineOptions(dtype="float32", int8_small_batch="off", fp16_matrices="off"))


def hf_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_float32_prefill_and_decode_equal_the_hf_forward(tiny32):
    ids = tiny32.encode_raw("The quick brown fox jumps over the lazy dog and keeps running")
    ref = hf_logits(tiny32, ids)
    with torch.inference_mode():
        fast = FastLlama(tiny32.fast_weights(), rows=2)
        got = fast.prefill(1, ids[:5], 0)
        assert torch.allclose(got, ref[4], atol=1e-4)
        # the rest one token at a time, as decode steps of row 0 next to a busy row 1
        fast.move_row(1, 0)
        fast.prefill(1, ids[:3], 0)
        for pos in range(5, len(ids)):
            out = fast.decode(torch.tensor([ids[pos], ids[pos % 3]]), torch.tensor([pos, 3 + pos - 5]))
            assert torch.allclose(out[0], ref[pos], atol=1e-4), pos


def test_cache_rows_are_allocated_as_they_are_used(tiny32):
    """The cache holds the rows in use, doubling as rows join (zeroing every row of the
    largest batch made an idle engine's next request wait), and growing it keeps what the
    rows hold: row 0 decodes exactly as alone while seven rows join beside it."""
    ids = tiny32.encode_raw("The quick brown fox jumps over the lazy dog and keeps running")
    other = tiny32.encode_raw("Once upon a time")
    ref = hf_logits(tiny32, ids)
    with torch.inference_mode():
        fast = FastLlama(tiny32.fast_weights(), rows=8)
        fast.prefill(0, ids[:5], 0)
        assert fast.allocated == 1 and fast.k[0].shape[0] == 1
        held, B = {1}, 1
        for pos in range(5, len(ids)):
            if B < 8:
                fast.prefill(B, other, 0)  # a row joins
                B += 1
                held.add(fast.allocated)
                assert fast.allocated >= B and fast.k[0].shape[0] == fast.allocated
            tokens = torch.tensor([ids[pos]] + [other[0]] * (B - 1))
            out = fast.decode(tokens, torch.tensor(fast.lengths[:B]))
            assert torch.allclose(out[0], ref[pos], atol=1e-4), pos
        assert held == {1, 2, 4, 8}
        fast.release_all()
        assert fast.allocated == 0 and not fast.k


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_prefill_equals_whole(tiny32, chunk):
    ids = tiny32.encode_raw("Once upon a time in a land far away, there lived a very old tortoise")
    with torch.inference_mode():
        fast = FastLlama(tiny32.fast_weights(), rows=1)
        whole = fast.prefill(0, ids, 0)
        fast.release_all()
        for start in range(0, len(ids), chunk):
            part = fast.prefill(0, ids[start:start + chunk], start, logits=start + chunk >= len(ids))
        assert torch.allclose(part, whole, atol=1e-4)


async def _greedy(engine: Engine, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    toks, lps = [], []
    async for out in engine.submit(ids, SamplingParams(max_tokens=n)):
        if isinstance(out, TokenStep):
            toks.append(out.token_id)
            lps.append(out.logprob)
        elif isinstance(out, Finished):
            assert out.error is None
    return toks, lps


async def test_prefix_cache_and_chunked_prefill_do_not_change_outputs(tiny32):
    system = "You are a careful assistant. " * 6
    prompts = [tiny32.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in ("Hi", "What is two plus two?", "Name a colour.")]
    long_prompt = tiny32.encode_raw("word " * 300)  # grows the cache past its first capacity (256)

    async def run(**kw):
        engine = Engine(tiny32, max_batch_size=4, **kw)
        engine.start()
        try:
            outs = [await _greedy(engine, p, 6) for p in prompts]
            # a long prompt fed in chunks while another request decodes
            both = await asyncio.gather(_greedy(engine, prompts[0], 40), _greedy(engine, long_prompt, 6))
            return outs, both, engine
        finally:
            await engine.stop()

    plain, plain_both, _ = await run(prefix_cache_tokens=0, prefill_chunk=100_000)
    cached, cached_both, engine = await run(prefill_chunk=16)
    assert engine._backend.prefixes.hits >= 2 * 48  # the system turn, for the 2nd and 3rd prompt
    for (a_ids, a_lps), (b_ids, b_lps) in zip(plain + list(plain_both), cached + list(cached_both)):
        assert a_ids == b_ids
        assert a_lps == pytest.approx(b_lps, abs=1e-4)


REAL_PROMPTS = [
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Give three tips for learning the piano.",
    "Write a haiku about the sea.",
]


@pytest.mark.parametrize("dtype, attention", [("float32", "matmuls"), ("bfloat16", "sdpa")])
def test_fast_path_matches_float32_eager_on_the_real_model(real_model_dir, dtype, attention):
    """float32 with the two float32 matmuls: exact. bfloat16 with SDPA's bfloat16 attention
    (auto's choice on a CPU with AMX; the matmuls' float32 attention is the more exact one)."""
    lm = load_model(real_model_dir, device="cpu",
                    options=EngineOptions(dtype=dtype, int8_small_batch="off", fp16_matrices="off",
                                          decode_attention=attention))
    assert lm.fast_weights().sdpa_decode == (attention == "sdpa")
    prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    fid = measure(lm, prompts, tokens=12)
    assert fid.positions == 48
    if dtype == "float32":
        assert fid.agreement == 1.0
        assert fid.max_abs_dlogprob < 1e-3
    else:
        assert fid.agreement >= 0.97
        assert fid.mean_abs_dlogprob <= 0.05


@pytest.mark.parametrize("dtype", ["float32", "auto"])
async def test_chunked_prefill_gives_the_unchunked_greedy_answer_on_the_real_model(real_model_dir, dtype):
    """A fixed ~400-token prompt, fed whole while nothing runs, then in chunks of 48 while
    another request decodes: the same greedy tokens."""
    # float32 without int8 or float16 matrices: chunks must not change the products at all;
    # auto: whatever the machine picks (int8 copies for small steps, float16 matrices where
    # bfloat16 is not native), within the bench's tolerance
    exact = dtype == "float32"
    lm = load_model(real_model_dir, device="cpu",
                    options=EngineOptions(dtype=dtype, prefix_cache_tokens=0, int8_small_batch="off" if exact else "auto",
                                          fp16_matrices="off" if exact else "auto"))
    text = ("A lighthouse keeper writes in his log every night: the weather, the ships that passed, "
            "the state of the lamp and of the lenses. ") * 12
    long_prompt = lm.encode_chat([{"role": "user", "content": text + "Summarize the log in one sentence."}])
    other = lm.encode_chat([{"role": "user", "content": "Count from one to twenty."}])
    assert len(long_prompt) > 300

    async def run(chunk: int, alongside: bool):
        engine = Engine(lm, max_batch_size=2, prefill_chunk=chunk)
        engine.start()
        try:
            if not alongside:
                return await _greedy(engine, long_prompt, 12)
            first = asyncio.create_task(_greedy(engine, other, 40))
            await asyncio.sleep(0.3)  # the other request is decoding when the long one arrives
            long = await _greedy(engine, long_prompt, 12)
            await first
            return long
        finally:
            await engine.stop()

    whole_ids, whole_lps = await run(100_000, alongside=False)
    chunked_ids, chunked_lps = await run(48, alongside=True)
    assert chunked_ids == whole_ids
    assert chunked_lps == pytest.approx(whole_lps, abs=0.05 if dtype == "auto" else 1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_matrices_give_the_plain_matrices_logits(tiny_model_dir, dtype):
    """INFERQL_PACKED_WEIGHTS: oneDNN's layout is a faster way to the same products."""
    packed = load_model(tiny_model_dir, device="cpu",
                        options=EngineOptions(dtype=dtype, int8_small_batch="off", fp16_matrices="off"))
    plain = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype=dtype, int8_small_batch="off",
                                                                           fp16_matrices="off", packed_weights="off"))
    assert not plain.fast_weights().layers[0][1].is_mkldnn
    if not onednn.usable(torch.device("cpu"), getattr(torch, dtype)):  # bfloat16 without AVX512 or AVX-NE-CONVERT
        assert not packed.fast_weights().layers[0][1].is_mkldnn  # the load fell back to plain weights
        return
    assert packed.fast_weights().layers[0][1].is_mkldnn and packed.fast_weights().head.is_mkldnn
    ids = packed.encode_raw("The quick brown fox jumps over the lazy dog")
    outs = []
    with torch.inference_mode():
        for lm in (packed, plain):
            fast = FastLlama(lm.fast_weights(), rows=2)
            logits = [fast.prefill(0, ids[:6], 0)]
            fast.prefill(1, ids[:3], 0)
            for pos in range(6, len(ids)):
                logits.append(fast.decode(torch.tensor([ids[pos], ids[pos % 3]]), torch.tensor([pos, pos - 3]))[0])
            outs.append(torch.stack(logits))
    assert torch.allclose(outs[0], outs[1], atol=1e-4 if dtype == "float32" else 2e-2)
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()


def test_packed_matrices_only_where_onednn_runs_them():
    assert onednn.usable(torch.device("cpu"), torch.float32)
    # bfloat16 where oneDNN can pack it here (it refuses on a CPU without AVX512 or
    # AVX-NE-CONVERT): usable answers, never raises
    try:
        onednn.pack(torch.randn(48, 32).to(torch.bfloat16))
        packs = True
    except RuntimeError:
        packs = False
    assert onednn.usable(torch.device("cpu"), torch.bfloat16) == packs
    assert not onednn.usable(torch.device("cpu"), torch.float16)
    assert not onednn.usable(torch.device("cuda"), torch.bfloat16)


def test_decode_attention_choice(monkeypatch, tiny_model_dir):
    """auto: SDPA on a GPU and for bfloat16 on a CPU with AMX, else the two matmuls; the
    setting forces either; the CPU's flags decide, so every process on a machine agrees."""
    from app.inference import cpu, fastllama
    from app.settings import Settings

    cpu_dev, gpu = torch.device("cpu"), torch.device("cuda")
    for has_amx in (False, True):
        monkeypatch.setattr(cpu, "amx", lambda: has_amx)
        assert fastllama.decode_with_sdpa("auto", cpu_dev, torch.bfloat16) is has_amx
        assert fastllama.decode_with_sdpa("auto", cpu_dev, torch.float32) is False
        assert fastllama.decode_with_sdpa("auto", gpu, torch.float32) is True
        assert fastllama.decode_with_sdpa("sdpa", cpu_dev, torch.float32) is True
        assert fastllama.decode_with_sdpa("matmuls", gpu, torch.bfloat16) is False
    with pytest.raises(ValueError):
        fastllama.decode_with_sdpa("flash", cpu_dev, torch.bfloat16)
    for value in ("sdpa", "matmuls"):
        monkeypatch.setenv("INFERQL_DECODE_ATTENTION", value)
        options = EngineOptions.from_settings(Settings(_env_file=None))
        assert options.decode_attention == value
        lm = load_model(tiny_model_dir, device="cpu", options=options)
        assert lm.fast_weights().sdpa_decode == (value == "sdpa")
        assert ("by SDPA" in lm.matrix_format) == (value == "sdpa")
    monkeypatch.delenv("INFERQL_DECODE_ATTENTION")
    assert Settings(_env_file=None).decode_attention == EngineOptions().decode_attention == "auto"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_equals_sdpa(tiny_model_dir, dtype):
    """A decode step's attention: the two matmuls CPUs run give what SDPA (a GPU's path) gives."""
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype=dtype, int8_small_batch="off"))
    ids = lm.encode_raw("Once upon a time in a land far away, there lived a very old tortoise")
    outs = []
    with torch.inference_mode():
        for sdpa in (False, True):
            fast = FastLlama(lm.fast_weights(), rows=3)
            fast.sdpa_decode = sdpa
            for row, n in enumerate((5, 3, 8)):  # rows of different lengths: the mask matters
                fast.prefill(row, ids[:n], 0)
            steps = []
            for i in range(4):
                tokens = torch.tensor([ids[5 + i], ids[3 + i], ids[8 + i]])
                steps.append(fast.decode(tokens, torch.tensor([5 + i, 3 + i, 8 + i])))
            outs.append(torch.stack(steps))
    assert torch.allclose(outs[0], outs[1], atol=1e-4 if dtype == "float32" else 5e-2)
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()
