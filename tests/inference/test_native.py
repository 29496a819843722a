"""The native decode step (native.py, native/decode_step.c) against torch.

Its products multiply the int8 copies by activations quantized to 15 bits, so against a
float32 forward over the same int8 weights (dequantized) it differs only by that and by the
order of the sums: the tiny model's weights are replaced by their int8 round trip first,
which makes the dense float32 path an exact reference for the kernel. The real model checks
fidelity against the float32 eager reference (test_int8.py runs both int8 paths).
"""

from __future__ import annotations

import pytest
import torch

import platform

from app.inference import cpu, int8, native
from app.inference.fastllama import FastLlama, FastWeights
from app.inference.model import EngineOptions, load_model
from app.settings import Settings

# Where the engine runs the step at all (an x86-64 CPU with AVX2); the products and the
# library build are tested everywhere.
needs_step = pytest.mark.skipif(not native.usable(torch.device("cpu"), torch.float32),
                                reason="the native step runs on x86-64 CPUs with AVX2")

# The machine's own instruction set, and on x86-64 the library built for AVX2 alone (the
# AVX2 products) and for no vector extension (the plain loops), where this CPU runs them.
MARCHES = ["native"]
if platform.machine() == "x86_64":
    if {"avx2", "fma", "bmi2", "f16c", "movbe"} <= cpu.flags():
        MARCHES.append("x86-64-v3")
    MARCHES.append("x86-64")


@pytest.mark.parametrize("k", [576, 1536, 40, 100])  # 40, 100: tails past the vector width
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16])
@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("with_blocks", [False, True])  # the blocked products from blocked_from rows (200 = 6 blocks + 8)
def test_gemv_equals_the_float_product(k, rows, march, with_blocks):
    torch.manual_seed(k + rows)
    w = torch.randn(200, k) * torch.linspace(0.05, 2.0, 200)[:, None]
    q, s = int8.quantize(w, torch.float32)
    x = torch.randn(rows, k) * 3
    x[:, 7] = 40.0  # an outlier channel: every row's scale follows its largest value
    bias = torch.randn(200)
    ref = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
    got = native.gemv(q, s, x, bias, march=march, with_blocks=with_blocks)
    assert got.shape == (rows, 200) and got.dtype == torch.float32
    # 15-bit activations: each term within |w| * max|x| / 65534 of exact
    bound = (q.double().abs() * s.double()[:, None]).sum(1) * x.abs().amax(1, keepdim=True).double() / 65534
    assert ((got.double() - ref).abs() <= bound + 1e-4).all()


@needs_step
@pytest.mark.parametrize("march", MARCHES)
def test_each_build_says_from_how_many_rows_it_takes_the_blocked_products(march, rounded):
    avx512 = march == "native" and "avx512bw" in cpu.flags()
    avx2_alone = march == "x86-64-v3" or (march == "native" and not avx512 and "avx2" in cpu.flags())
    assert native.blocked_from(march) == (2 if avx2_alone else 5)
    # the blocked copies (as many bytes again) are made only where a step takes them
    for rows, made in ((native.blocked_from(march) - 1, False), (native.blocked_from(march), True)):
        step = _weights(rounded, torch.float32, True, march, rows).native
        assert all((m.wb is not None) == made for layer in step._layers for m in (layer.qkv, layer.o, layer.gu,
                                                                                   layer.down))


def _tiles_here() -> bool:
    """The build's products run on AMX tiles here (a CPU with AMX-BF16; the library built)."""
    try:
        return native.usable(torch.device("cpu"), torch.float32) and native.amx_from() > 0
    except RuntimeError:  # no compiler: test_without_a_compiler_the_steps_stay_on_torch's case
        return False


tiles = pytest.mark.skipif(not _tiles_here(), reason="the products run on AMX tiles on a CPU with AMX-BF16")


@tiles
@pytest.mark.parametrize("k", [576, 1536, 96])
@pytest.mark.parametrize("rows", [7, 8, 16, 17, 40, 64])
def test_products_on_the_tiles_equal_the_float_product(k, rows):
    """From amx_from rows a bfloat16 model's products run on the tiles: their activations
    rounded to bfloat16 (8 bits), the sums in float32; below that, as for a float32 model."""
    torch.manual_seed(k + rows)
    w = torch.randn(200, k) * torch.linspace(0.05, 2.0, 200)[:, None]  # 6 blocks and a tail of 8
    q, s = int8.quantize(w, torch.float32)
    x = torch.randn(rows, k) * 3
    x[:, 7] = 40.0
    wd = q.double() * s.double()[:, None]
    got = native.gemv(q, s, x, with_blocks=True, bf16=True).double()
    if native.on_tiles(rows, torch.bfloat16):
        # exactly the product of the bfloat16-rounded rows, up to float32 sums
        ref = x.bfloat16().double() @ wd.T
        bound = x.bfloat16().double().abs() @ wd.abs().T * 2e-6 + 1e-5
    else:
        ref = x.double() @ wd.T
        bound = wd.abs().sum(1) * x.abs().amax(1, keepdim=True).double() / 65534 + 1e-4
    assert ((got - ref).abs() <= bound).all()


@needs_step
@pytest.mark.parametrize("march", MARCHES)
def test_a_bfloat16_model_takes_64_rows_where_the_tiles_run(march):
    on_tiles = march == "native" and {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu.flags()
    assert native.amx_from(march) == (8 if on_tiles else 0)
    assert native.max_rows(torch.bfloat16, march) == (64 if on_tiles else 16)
    assert native.max_rows(torch.float32, march) == 16


def test_gemv_rejects_too_many_rows():
    q, s = int8.quantize(torch.randn(8, 32), torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError):
            native.gemv(q, s, torch.randn(native.max_rows(dtype) + 1, 32), bf16=dtype == torch.bfloat16)


def _int8_round_trip(model: torch.nn.Module) -> None:
    """Every matrix of the layers and the head replaced by its int8 copy, dequantized. The
    copies' scales are bfloat16 for float32 and bfloat16 models alike (int8.activations), and
    quantizing the result again gives the same int8 weights and scales."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # the head is tied to the embeddings here
            if p.dim() == 2:
                q, s = int8.quantize(p, torch.bfloat16)
                p.copy_(q.float() * s.float()[:, None])


@pytest.fixture(scope="module")
def rounded(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="float32", fast_path="auto",
                                                                        int8_small_batch="off", fp16_matrices="off"))
    _int8_round_trip(lm.model)
    return lm


@pytest.fixture(scope="module")
def rounded64():
    """A random Llama with 64-wide heads (SmolLM2's; the tiny model's are 16 wide): the native
    attention's vector path (AVX512) is for head sizes 64 and 128, the rest loops."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=192, intermediate_size=384,
                                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)).eval()
    _int8_round_trip(model)
    return model


def _weights(lm, dtype: torch.dtype, natively: bool, march: str = "native", rows: int = 4) -> FastWeights:
    model = lm if isinstance(lm, torch.nn.Module) else lm.model
    w = FastWeights(model, dtype, torch.device("cpu"))
    if natively:
        w.add_int8(rows)
        w.add_native(march)
    return w


@needs_step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", ["16 wide", "64 wide"])
@pytest.mark.parametrize("march", MARCHES)
# blocked products from 2 rows (AVX2 builds) or 5 (the others); AMX tiles from 8 (bfloat16)
@pytest.mark.parametrize("rows", [4, 16, 64])
def test_the_native_step_equals_torch_over_the_same_weights(request, rounded, dtype, heads, march, rows):
    if heads == "16 wide":
        model, ids = rounded, rounded.encode_raw("The quick brown fox jumps over the lazy dog and keeps on running far"
                                                 " and then it stops by the river for a drink of cold water")
    else:
        model, ids = request.getfixturevalue("rounded64"), list(range(40, 400, 7))
    if rows > native.max_rows(dtype, march):
        pytest.skip(f"{rows} rows: a bfloat16 model's steps on AMX tiles only")
    ref_w, nat_w = _weights(model, torch.float32, False), _weights(model, dtype, True, march, rows)
    assert nat_w.native is not None and nat_w.int8_rows == rows
    tiles = native.on_tiles(rows, dtype, march)
    tol = 2e-4 if dtype == torch.float32 else 0.05  # a bfloat16 cache rounds keys and values
    if tiles:
        tol = 0.1  # and on the tiles, every product's activations
    with torch.inference_mode():
        ref, nat = FastLlama(ref_w, rows), FastLlama(nat_w, rows)
        for fast in (ref, nat):
            for r in range(rows):  # rows of different lengths
                fast.prefill(r, ids[:3 + 2 * r], 0, logits=False)
        for step in range(5):
            batch = {4: [1, 2, 4, 3, 4], 16: [16, 5, 9, 16, 13], 64: [64, 8, 40, 64, 17]}[rows][step]
            toks = torch.tensor((ids * 4)[step:step + batch])
            pos = torch.tensor(ref.lengths[:batch])
            a, b = ref.decode(toks, pos), nat.decode(toks, pos)
            assert b.shape == a.shape == (batch, nat_w.vocab) and b.dtype == torch.float32
            assert (a - b).abs().max() < tol
            if not tiles:
                assert torch.equal(a.argmax(-1), b.argmax(-1))
            else:  # the random model's near-ties may flip, by less than the tolerance
                rows_ = torch.arange(batch)
                assert (a[rows_, a.argmax(-1)] - a[rows_, b.argmax(-1)] < tol).all()
                assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
            assert nat.lengths == ref.lengths
        # the new keys and values went where torch's would
        for li in range(nat_w.n_layers):
            n = nat.lengths[0]
            assert (ref.k[li][0, :, :n].float() - nat.k[li][0, :, :n].float()).abs().max() < tol
            assert (ref.v[li][0, :, :n].float() - nat.v[li][0, :, :n].float()).abs().max() < tol


@needs_step
def test_a_bigger_step_stays_on_torch(rounded):
    w = _weights(rounded, torch.float32, True)
    calls = []
    real = w.native.step
    w.native.step = lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1]
    ids = rounded.encode_raw("one two three four five six seven eight nine ten")
    rows = w.int8_rows + 1
    with torch.inference_mode():
        fast = FastLlama(w, rows)
        for r in range(rows):
            fast.prefill(r, ids[:4], 0, logits=False)
        fast.decode(torch.tensor(ids[:rows]), torch.tensor([4] * rows))
        fast.decode(torch.tensor(ids[:2]), torch.tensor([5] * 2))
    assert calls == [2]


@needs_step
@pytest.mark.parametrize("march", MARCHES)
def test_a_bigger_step_runs_natively_in_groups_where_set(rounded, march):
    """native_groups: 11 rows on a 4-row native step are calls of 4, 4 and 3 rows, each on its
    own rows' cache (the pointers offset by the group's first row); logits as torch's over the
    same weights, and each row's new key and value where torch puts them."""
    ref_w, nat_w = _weights(rounded, torch.float32, False), _weights(rounded, torch.float32, True, march)
    nat_w.native_groups = True
    calls = []
    real = nat_w.native.step
    nat_w.native.step = lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1]
    ids = rounded.encode_raw("The quick brown fox jumps over the lazy dog and keeps on running far away")
    rows = 11
    with torch.inference_mode():
        ref, nat = FastLlama(ref_w, rows), FastLlama(nat_w, rows)
        for fast in (ref, nat):
            for r in range(rows):  # rows of different lengths
                fast.prefill(r, ids[:2 + r], 0, logits=False)
        for step in range(3):
            toks = torch.tensor(ids[step:step + rows])
            pos = torch.tensor(ref.lengths[:rows])
            a, b = ref.decode(toks, pos), nat.decode(toks, pos)
            assert (a - b).abs().max() < 2e-4 and torch.equal(a.argmax(-1), b.argmax(-1))
    assert calls == [4, 4, 3] * 3 and nat.lengths == ref.lengths
    for li in range(nat_w.n_layers):
        for r in (0, 5, 10):  # a row of each group
            n = nat.lengths[r]
            assert (ref.k[li][r, :, :n] - nat.k[li][r, :, :n]).abs().max() < 2e-4
            assert (ref.v[li][r, :, :n] - nat.v[li][r, :, :n]).abs().max() < 2e-4


@needs_step
def test_a_position_past_the_cache_is_an_error_not_a_write(rounded):
    w = _weights(rounded, torch.float32, True)
    with torch.inference_mode():
        fast = FastLlama(w, 1)
        fast.prefill(0, rounded.encode_raw("hello there"), 0, logits=False)
        h = torch.zeros(1, w.hidden)
        with pytest.raises(RuntimeError, match="native decode step failed"):
            w.native.step(h, *fast.cache_pointers(), fast.capacity, [fast.capacity], torch.empty(1, w.vocab))


@needs_step
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_runs_every_row_it_can_natively_and_off_keeps_torch(tiny_model_dir, dtype):
    on = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype=dtype))
    rows = 64 if dtype == "bfloat16" and native.amx_from() else 16  # on AMX tiles: 64
    assert on.fast_weights().native is not None and on.fast_weights().int8_rows == rows
    assert "run as one native call" in on.matrix_format
    off = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype=dtype, native_step="off",
                                                                         fp16_matrices="off"))
    assert off.fast_weights().native is None and off.fast_weights().int8_rows == int8.AUTO_ROWS
    none = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype=dtype, int8_small_batch="off"))
    assert none.fast_weights().native is None and none.fast_weights().int8_rows == 0


def test_a_cpu_without_avx2_keeps_torch(monkeypatch, tiny_model_dir):
    """Built without vectors the step is several times slower than torch's (see usable)."""
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"sse4_2"}))
    w = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="bfloat16")).fast_weights()
    assert w.native is None and w.int8_rows == int8.AUTO_ROWS


@needs_step
def test_without_a_compiler_the_steps_stay_on_torch(monkeypatch, tmp_path, tiny_model_dir, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(native.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    native.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="failed"):
            native.build()
        lm = load_model(tiny_model_dir, device="cpu", options=EngineOptions(dtype="bfloat16"))
        w = lm.fast_weights()
    finally:
        native.library.cache_clear()
    assert w.native is None and w.int8_rows == int8.AUTO_ROWS
    assert "native decode step unavailable" in caplog.text


def test_the_library_is_built_once_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native.build()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / "inferql" / "native" and list(first.parent.iterdir()) == [first]


def test_the_setting_reaches_engine_options(monkeypatch):
    monkeypatch.setenv("INFERQL_NATIVE_STEP", "off")
    assert EngineOptions.from_settings(Settings(_env_file=None)).native_step == "off"
    monkeypatch.delenv("INFERQL_NATIVE_STEP")
    assert Settings(_env_file=None).native_step == EngineOptions().native_step == "auto"
