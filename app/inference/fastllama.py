"""A lean decoder for Llama-family models with a preallocated per-row KV cache.

The Hugging Face forward is general: per layer it builds masks, dispatches through the
attention interface and grows a DynamicCache by concatenation. For a 135M model on a
small CPU that bookkeeping costs more than the arithmetic, so the engine runs supported
models (LlamaForCausalLM and the same architecture under other names) through this module
instead, with the model's own weights:

* q/k/v and gate/up projections are fused into one matrix each (one GEMM instead of 2-3);
* weights are kept in the chosen dtype (bfloat16 where the CPU has native support), the
  residual stream, the norms and the final logits in float32;
* optionally (INFERQL_INT8_SMALL_BATCH, int8.py) the matrices also have an int8 copy with
  per-output-channel scales, used by decode steps of at most `int8_rows` rows, where a
  step is bound by the bytes of weights it reads; bigger steps and prefills use the dense
  weights; on CPU those steps run as one native call (native.py) where it builds, and
  where it pays (`native.groups_pay`) bigger decode steps too, one call per `int8_rows` rows;
* on CPU the matrices are prepacked for oneDNN (onednn.py), or for a float32 model kept in
  float16 and multiplied in float32 by fbgemm, the head in int8 (fbgemm.py); a decode
  step's attention is two batched float32 matmuls (`_decode_attention`) rather than torch's
  SDPA kernel, except for a bfloat16 model on a CPU with AMX (`decode_with_sdpa`);
* the KV cache is one preallocated tensor per layer, `[rows, kv_heads, capacity, head_dim]`,
  in the weights' dtype (a float32 cache on CPU spared the attention its conversions but was
  not measurably faster, and doubled the memory: every row has the longest row's capacity).
  Running requests occupy rows 0..B-1; when one ends the last row moves into its place,
  so a decode step reads a view of the cache, never a gathered copy. Each row keeps its
  own length; the attention mask hides the columns past it. The capacity grows by
  doubling when a row outgrows it, the rows as they are used, and both shrink back when the
  batch drains;
* a prompt is prefilled in chunks that append to its row, so a long prompt can be
  interleaved with decode steps of the other rows, and a cached prefix (copied from the
  prefix cache) is simply the first chunk already done.

Logits come out in float32: the final norm runs in float32 and the head multiplies in the
weights' dtype, then the top candidates of each row are recomputed exactly in float32 (see
`logits`), so the logprobs, confidence and greedy choice do not carry bfloat16 rounding.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from . import cpu, fbgemm, int8, native, onednn

SUPPORTED = {"llama", "mistral", "qwen2"}
# Candidates per row whose logits are recomputed in float32. With the int8 head (fbgemm.py)
# 64 rather than 16 halved the mean |d logprob| against float32 eager (0.011 -> 0.0055 on
# the bench's prompts) for ~0.8 ms more per 16-row step.
EXACT_TOP = 64


def supports(model: torch.nn.Module) -> str | None:
    """None when the model can run here, else why not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return f"model type {getattr(cfg, 'model_type', None)!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "mlp_bias", False):
        return "mlp bias"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and cfg.model_type == "mistral":
        return "sliding window"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", "linear", "llama3"):
        return f"rope type {kind!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    return None


def _mm(x: torch.Tensor, w, w8: tuple | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias), through the int8 copy w8 = (int8 weights, scales) when given."""
    return dense(x, w, bias) if w8 is None else int8.linear(x, *w8, bias)


_FBGEMM = (fbgemm.Float16, fbgemm.Int8Head)


def dense(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a matrix in any of the fast path's dense forms: a plain tensor,
    oneDNN-packed, or fbgemm's (float16 matrices; the head in int8)."""
    if type(w) in _FBGEMM:
        return w.linear(x, bias)
    return onednn.linear(x, w, bias)


def nbytes(w) -> int:
    return w.nbytes if type(w) in _FBGEMM else w.numel() * w.element_size()


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Attention of one new token per row, in float32. q: [B, H, 1, D] float32; keys, values:
    [B, KV, W, D] (views of the cache); mask: [B * KV, H / KV, W] additive, float32.
    Returns [B * KV, H / KV, D] float32 (the heads in order).

    Two batched matmuls per layer, the query heads that share a key/value head (GQA) as one
    [H / KV, D] block against it: with one query per row, torch's CPU SDPA kernel (flash
    attention, built for long queries) took 3-6x longer on an AVX512-BF16 CPU without AMX
    (`scripts/bench.py --kernels`: 115 vs 37 us at 1 row, 1.6 vs 0.26 ms at 16 rows of 200
    positions); with AMX it is the faster one (decode_with_sdpa)."""
    B, H, _, D = q.shape
    KV, W = keys.shape[1], keys.shape[2]
    # (in the cache's bfloat16, the scores would be rounded to 8 bits of mantissa)
    keys = keys.float().reshape(B * KV, W, D)
    scores = torch.baddbmm(mask, q.reshape(B * KV, H // KV, D), keys.transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), values.float().reshape(B * KV, W, D))


ATTENTION = ("auto", "sdpa", "matmuls")


def decode_with_sdpa(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a decode step's attention runs torch's SDPA (else `_decode_attention`).
    INFERQL_DECODE_ATTENTION: `auto` takes SDPA on a GPU, and on a CPU with AMX for a bfloat16
    model: there torch's flash attention multiplies its bfloat16 blocks on the AMX tiles and
    beat the two float32 matmuls 1.9x at 1 row and 2.3x at 16 (`bench.py --kernels`), a
    whole 64-row step over 400 positions 1.8x. Without AMX the two matmuls were 3x faster
    (AVX512-BF16) or even (AVX2). Decided by the CPU's flags, not timed, so every process on a
    machine runs the same path."""
    if setting not in ATTENTION:
        raise ValueError(f"decode attention {setting!r}: one of {', '.join(ATTENTION)}")
    if setting != "auto":
        return setting == "sdpa"
    return device.type != "cpu" or (dtype == torch.bfloat16 and cpu.amx())


class FastWeights:
    """The model's weights, rearranged for the lean forward (shared by every engine on a model)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device,
                 packed: bool = False, half: bool = False, attention: str = "auto") -> None:
        """packed: the 16-bit (or float32) matrices in oneDNN's layout (onednn.py; CPU only).
        half: a float32 model's matrices in float16 for fbgemm instead (fbgemm.py; CPU only).
        attention: a decode step's attention (decode_with_sdpa)."""
        cfg = model.config
        inner = model.model
        self.dtype = dtype
        self.device = device
        self.half = half
        self.packed = packed and not half
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.eps = float(cfg.rms_norm_eps)
        self.max_len = int(getattr(cfg, "max_position_embeddings", 2048))
        self.vocab = cfg.vocab_size
        self.sdpa_decode = decode_with_sdpa(attention, device, dtype)
        self._model = model

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def mat(t: torch.Tensor):  # a matrix only ever multiplied by
            if half:
                return fbgemm.Float16(t)
            return onednn.pack(w(t)) if packed else w(t)

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=torch.float32).contiguous()

        self.sm_scale = 1.0 / math.sqrt(self.head_dim)
        # Per layer: (input norm, qkv, its bias or None, o, post-attention norm, gate+up, down)
        self.layers: list[tuple] = []
        for li, layer in enumerate(inner.layers):
            qkv, bias, o, gu, d = self.matrices(li)
            self.layers.append((f32(layer.input_layernorm.weight), mat(qkv), None if bias is None else bias.to(dtype),
                                mat(o), f32(layer.post_attention_layernorm.weight), mat(gu), mat(d)))
        self.norm = f32(inner.norm.weight)
        self.embed = w(inner.embed_tokens.weight)
        head = model.get_output_embeddings().weight
        tied = head is inner.embed_tokens.weight
        if half:  # its pass over the whole vocabulary in int8, where it runs (fbgemm.py)
            self.head = fbgemm.int8_head(head) or mat(head)
        elif packed:
            self.head = mat(head)
        else:
            self.head = self.embed if tied and dtype != torch.float32 else w(head)
        # float32 rows of the head, indexed to recompute the top candidates exactly (16-bit
        # weights), or to score a few tokens (classify)
        self.head32 = f32(head) if half or packed or dtype != torch.float32 else self.head
        # the head's logits are exact float32 products (else its top candidates are recomputed)
        self.exact_head = dtype == torch.float32 and not half
        rot = inner.rotary_emb
        inv_freq = rot.inv_freq.detach().to(device=device, dtype=torch.float32)
        freqs = torch.arange(self.max_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = float(getattr(rot, "attention_scaling", 1.0))
        self.cos = (emb.cos() * scale).contiguous()  # [max_len, head_dim], float32
        self.sin = (emb.sin() * scale).contiguous()
        half = self.head_dim // 2  # rotate_half(x) * sin == swap_halves(x) * sin_signed
        self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1).contiguous()
        self.int8_rows = 0  # steps of at most this many rows use the int8 copies (0: never)
        self.layers8: list[tuple] = []
        self.head8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.native: native.NativeStep | None = None  # runs those steps in one call (add_native)
        self.native_groups = False  # bigger steps too, as native calls of int8_rows rows each

    def matrices(self, li: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer li's matrices in float32 on the device (layer_matrices)."""
        return self.layer_matrices(self._model, li, self.device)

    @staticmethod
    def layer_matrices(model: torch.nn.Module, li: int, device: torch.device) \
            -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer li's matrices in float32 on the device, q/k/v and gate/up stacked into one
        matrix each: (qkv, qkv bias or None, o, gate+up, down).

        (Folding the norms' weights into these matrices would save nothing, F.rms_norm
        takes its weight in the same op, and it cost greedy agreement with the float32
        reference in bfloat16: 97.5 % against 99.1 % on the bench's 20 prompts.)"""
        layer = model.model.layers[li]
        a, m = layer.self_attn, layer.mlp

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=torch.float32)

        qkv = torch.cat([f32(a.q_proj.weight), f32(a.k_proj.weight), f32(a.v_proj.weight)])
        bias = None
        if a.q_proj.bias is not None:
            bias = torch.cat([f32(a.q_proj.bias), f32(a.k_proj.bias), f32(a.v_proj.bias)])
        gu = torch.cat([f32(m.gate_proj.weight), f32(m.up_proj.weight)])
        return qkv, bias, f32(a.o_proj.weight).contiguous(), gu, f32(m.down_proj.weight).contiguous()

    def step_weight_bytes(self, rows: int = 1) -> int:
        """Bytes of weight matrices a decode step of `rows` rows reads (int8 copies included
        when that step takes them; once per native call where it is run in groups)."""
        calls = 1
        if self.layers8 and (rows <= self.int8_rows or self.native_groups):
            calls = -(-rows // self.int8_rows)
            mats = [t for layer in self.layers8 for pair in layer for t in pair]
            mats += list(self.head8) if self.head8 is not None else [self.head]
            mats += [layer[2] for layer in self.layers if layer[2] is not None]
        else:
            mats = [t for layer in self.layers for t in (layer[1], layer[2], layer[3], layer[5], layer[6])
                    if t is not None] + [self.head]
        return calls * sum(nbytes(t) for t in mats)

    def add_int8(self, rows: int) -> None:
        """Make the int8 copies (from the float32 master weights) and use them for decode
        steps of at most `rows` rows (0 drops them)."""
        act = int8.activations(self.dtype)
        if not rows or not int8.usable(self.device, self.dtype):
            self.int8_rows, self.layers8, self.head8 = 0, [], None
            return
        if not self.layers8:
            for li in range(self.n_layers):
                qkv, _, o, gu, d = self.matrices(li)
                self.layers8.append(tuple(int8.quantize(t, act) for t in (qkv, o, gu, d)))
            self.head8 = int8.quantize(self._model.get_output_embeddings().weight, act)
        self.int8_rows = rows

    def add_native(self, march: str = "native") -> None:
        """Run the int8 copies' decode steps in one native call (native.py), built for `march`.
        Raises RuntimeError when the library cannot be built or loaded."""
        if not self.int8_rows:
            raise RuntimeError("no int8 copies to run natively")
        if not native.usable(self.device, self.dtype) or self.int8_rows > native.max_rows(self.dtype, march):
            raise RuntimeError("the native step runs on an x86-64 CPU with AVX2, bfloat16 or float32, up to 16"
                               f" rows (64 on AMX tiles): not {self.int8_rows} rows, {self.device}, {self.dtype}")
        self.native = native.NativeStep(self, march)


class FastLlama:
    """The lean forward with one engine's KV cache."""

    def __init__(self, weights: FastWeights, rows: int) -> None:
        self.w = weights
        for name in ("dtype", "device", "n_layers", "n_heads", "n_kv", "head_dim", "hidden", "eps", "max_len",
                     "vocab", "layers", "norm", "embed", "head", "head32", "exact_head", "cos", "sin", "sin_signed",
                     "sm_scale"):
            setattr(self, name, getattr(weights, name))
        self.rows = rows
        self.sdpa_decode = weights.sdpa_decode  # else two batched matmuls (_decode_attention)
        self.min_capacity = 256
        self.capacity = 0
        self.allocated = 0  # rows the cache tensors hold: grown as rows are used, up to `rows`
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = [0] * rows  # tokens in each row's cache
        self._cache_ptrs: dict[int, tuple] = {}  # the cache's data per layer, by first row (native step)

    # ---- the cache -------------------------------------------------------------------

    def reserve(self, tokens: int, rows: int) -> None:
        """Make the cache hold `tokens` positions per row, in at least `rows` rows.

        Both grow by doubling. Rows are allocated as they are used, not all `self.rows` at
        once: the cache is zeroed when allocated, and a request arriving at an idle engine
        paid for every row of the largest batch (a float32 cache of 64 rows x 256 positions is
        755 MB for SmolLM2-135M: 200-750 ms before its first token, against ~1 ms for one row;
        an ad-hoc timing)."""
        if tokens <= self.capacity and rows <= self.allocated:
            return
        cap = self.capacity
        if tokens > cap:
            cap = max(self.min_capacity, cap)
            while cap < tokens:
                cap *= 2
            cap = min(cap, max(self.max_len, tokens))
        held = self.allocated
        rows = min(self.rows, max(rows, 2 * held)) if rows > held else held
        shape = (rows, self.n_kv, cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        used = max(self.lengths, default=0)
        if held and used:
            for old, new in zip(self.k + self.v, new_k + new_v):
                new[:held, :, :used].copy_(old[:, :, :used])
        self.k, self.v, self.capacity, self.allocated = new_k, new_v, cap, rows
        self._cache_ptrs = {}

    def release_all(self) -> None:
        """The batch drained: give the memory back (the next request allocates again)."""
        self.k, self.v, self.capacity, self.allocated = [], [], 0, 0
        self._cache_ptrs = {}
        self.lengths = [0] * self.rows

    def move_row(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        if n:
            for t in self.k + self.v:
                t[dst, :, :n].copy_(t[src, :, :n])
        self.lengths[dst] = n
        self.lengths[src] = 0

    def read(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions start..end-1 of a row: [layers, kv_heads, end - start, head_dim] each."""
        return (torch.stack([t[row, :, start:end] for t in self.k]),
                torch.stack([t[row, :, start:end] for t in self.v]))

    def write_prefix(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        self.reserve(n, row + 1)
        for li in range(self.n_layers):
            self.k[li][row, :, :n].copy_(k[li])
            self.v[li][row, :, :n].copy_(v[li])
        self.lengths[row] = n

    # ---- the forward -----------------------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, as x * cos + swap_halves(x) * sin_signed (float32)."""
        shape = x.shape
        swapped = x.unflatten(-1, (2, shape[-1] // 2)).flip(-2).reshape(shape)
        return torch.addcmul(x * cos, swapped, sin_signed)

    def _layers(self, h: torch.Tensor, positions: torch.Tensor, rows: slice | int, width: int,
                mask: torch.Tensor, write_at: torch.Tensor | int) -> torch.Tensor:
        """h: [B, T, hidden] float32, updated in place. positions: [B, T]. The new keys go to
        columns write_at (a [B] tensor for decode, T == 1; an int start column for a one-row
        prefill). mask: boolean, True where attended ([B, 1, T, width]), except for a decode
        step without SDPA (CPU): additive, [B * kv_heads, heads / kv_heads, width] (see decode)."""
        B, T, _ = h.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin_signed[positions][:, None]
        dt = self.dtype
        decode = isinstance(write_at, torch.Tensor)
        # Decode steps only: a prefill (even of one token, after a cached prefix) keeps the
        # dense weights, so a prompt's first token does not depend on the prefix cache.
        small = decode and B <= self.w.int8_rows
        none8 = (None, None, None, None)
        if decode:  # where each row's new key goes in a layer's cache seen as [rows * KV * capacity, D]
            slots = ((torch.arange(B * KV, device=h.device) * self.capacity).view(B, KV)
                     + write_at[:, None]).view(-1)
        # Ops per layer are few on purpose: at one row a decode step is ~1000 small ops, and
        # their dispatch, not the arithmetic, is a third of its time.
        for li, (ln1, wqkv, bqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            qkv8, o8, gu8, d8 = self.w.layers8[li] if small else none8  # int8 copies (see add_int8)
            qkv = _mm(self._rms(h, ln1).to(dt), wqkv, qkv8, bqkv)
            # q and k rotated together; float32 out (cos/sin are float32)
            qk = self._rope(qkv[..., :(H + KV) * D].view(B, T, H + KV, D).transpose(1, 2), cos, sin)
            q, k = qk[:, :H], qk[:, H:].to(dt)
            v = qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2).to(dt)
            kc, vc = self.k[li], self.v[li]
            if decode:
                # one index_copy_ per tensor: advanced-index assignment cost twice as much
                kc.view(-1, D).index_copy_(0, slots, k.reshape(B * KV, D))
                vc.view(-1, D).index_copy_(0, slots, v.reshape(B * KV, D))
                keys, values = kc[:B, :, :width], vc[:B, :, :width]
                if not self.sdpa_decode:
                    att = _decode_attention(q, keys, values, mask, self.sm_scale).view(B, T, H * D)  # float32
                else:
                    att = F.scaled_dot_product_attention(q.to(dt), keys, values, attn_mask=mask, scale=self.sm_scale,
                                                         enable_gqa=KV != H).transpose(1, 2).reshape(B, T, H * D)
            else:
                kc[rows, :, write_at:write_at + T] = k[0]
                vc[rows, :, write_at:write_at + T] = v[0]
                keys, values = kc[rows:rows + 1, :, :width], vc[rows:rows + 1, :, :width]
                att = F.scaled_dot_product_attention(q.to(dt), keys, values, attn_mask=mask, scale=self.sm_scale,
                                                     enable_gqa=KV != H)
                att = att.transpose(1, 2).reshape(B, T, H * D)
            h.add_(_mm(att.to(dt), wo, o8))
            gate, up = _mm(self._rms(h, ln2).to(dt), wgu, gu8).chunk(2, dim=-1)
            h.add_(_mm(F.silu(gate) * up, wd, d8))
        return h

    def _final(self, h: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """h: [B, hidden] float32 -> logits [B, vocab] float32."""
        h = self._rms(h, self.norm)
        head8 = self.w.head8 if decode and h.shape[0] <= self.w.int8_rows else None
        if head8 is not None:
            logits = int8.linear(h.to(self.dtype), *head8).float()
        elif self.exact_head:
            return _mm(h, self.head, None)
        else:
            logits = _mm(h.to(self.dtype), self.head, None).float()
        return self._exact_top(h, logits)

    def _exact_top(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, vocab] with each row's top EXACT_TOP recomputed in float32 from the
        final-normed h [B, hidden]."""
        # bfloat16 keeps 8 bits of mantissa: a logit of 20 carries an error up to ~0.08 (int8
        # weights, a comparable one; float16 weights ~0.01; the int8 head up to ~1). The
        # candidates that matter (the argmax, the top alternatives, the bulk of the softmax
        # mass) are recomputed in float32 from the float32 weights.
        top = logits.topk(EXACT_TOP, dim=-1).indices  # [B, k]
        exact = torch.einsum("bd,bkd->bk", h, self.head32[top])
        return logits.scatter_(1, top, exact)

    def prefill(self, row: int, ids: list[int], start: int, logits: bool = True) -> torch.Tensor | None:
        """Feed ids at positions start.. of a row (its cache holds exactly `start` already).
        Returns the float32 logits [vocab] of the last position (None when not asked for)."""
        T = len(ids)
        end = start + T
        self.reserve(end, row + 1)
        dev = self.device
        tokens = torch.tensor([ids], device=dev)
        positions = torch.arange(start, end, device=dev)[None]
        h = self.embed[tokens].float()
        cols = torch.arange(end, device=dev)
        mask = (cols[None, :] <= positions[0][:, None])[None, None]  # [1, 1, T, end]
        h = self._layers(h, positions, row, end, mask, start)
        self.lengths[row] = end
        return self._final(h[:, -1])[0] if logits else None

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for rows 0..B-1. tokens, positions: [B] long (position = the row's
        length). Returns logits [B, vocab] float32."""
        B = tokens.shape[0]
        width = max(self.lengths[:B]) + 1
        self.reserve(width, B)
        if self.w.native is not None and (B <= self.w.int8_rows or self.w.native_groups):
            return self._native_decode(tokens, positions)
        h = self.embed[tokens][:, None].float()
        cols = torch.arange(width, device=self.device)
        hidden = (cols[None, :] > positions[:, None])[:, None, None]  # [B, 1, 1, width]: past each row's end
        if not self.sdpa_decode:  # additive, one [heads / kv_heads, width] block per row and kv head
            G = self.n_heads // self.n_kv
            mask = torch.zeros((B, 1, 1, width), device=self.device)
            mask = mask.masked_fill_(hidden, float("-inf")).expand(B, self.n_kv, G, width).reshape(-1, G, width)
        else:
            mask = ~hidden
        h = self._layers(h, positions[:, None], slice(0, B), width, mask, positions)
        for i in range(B):
            self.lengths[i] += 1
        return self._final(h[:, 0], decode=True)

    def cache_pointers(self, row: int = 0) -> tuple:
        """The cache tensors' data per layer from `row` on, as the native step takes them (keys,
        values)."""
        ptrs = self._cache_ptrs.get(row)
        if ptrs is None:
            arr = ctypes.c_void_p * self.n_layers
            ptrs = self._cache_ptrs[row] = (arr(*[t[row].data_ptr() for t in self.k]),
                                            arr(*[t[row].data_ptr() for t in self.v]))
        return ptrs

    def _native_decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """decode() in native calls (native.py): the same step over the int8 copies, one call
        per `int8_rows` rows."""
        B, n = tokens.shape[0], self.w.int8_rows
        h = self.embed[tokens].float()
        logits = torch.empty(B, self.vocab, device=self.device)
        at = positions.tolist()
        for r in range(0, B, n):
            self.w.native.step(h[r:r + n], *self.cache_pointers(r), self.capacity, at[r:r + n], logits[r:r + n])
        for i in range(B):
            self.lengths[i] += 1
        return self._exact_top(h, logits)
