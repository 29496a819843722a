"""`--kernels`: three of the engine's means, each timed against what it replaced, the two
alternating in one process (a shared machine drifts; only ratios measured side by side mean
anything). About a minute; no server.

* matrices: one layer's four matmuls (qkv, o, gate+up, down), plain `F.linear` against the
  oneDNN-packed copies the fast path uses (app/inference/onednn.py), by rows;
* decode attention, one query per row: torch's SDPA against the two matmuls of
  `_decode_attention` (app/inference/fastllama.py);
* one OpenMP pool: a decode step on a thread of its own, with no other OpenMP pool alive,
  then while another thread that has run a parallel op is alive (app/inference/threads.py);
* the native step: a whole decode step of 1, 2 and 4 rows as one native call over the int8
  copies (app/inference/native.py), against torch's int8 op over the same copies and against
  the dense matrices the server's bigger steps take (fbgemm's float16 ones for a float32
  model where fbgemm runs, else packed); also 8 and 16 rows (the blocked products) against
  the dense matrices;
* float16 matrices (a float32 model only): a whole decode step with the oneDNN-packed
  float32 matrices against fbgemm's float16 ones, the head's full pass in int8 as served
  (app/inference/fbgemm.py), by rows.

Everything runs on one measuring thread that ends with the section; the thread that keeps a
second pool alive for the last measure is started and ended inside it.
"""

from __future__ import annotations

import statistics
import threading
import time

from app.inference.timing import alternate


def _matrices(lm, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    from app.inference import onednn

    dt = lm.dtype
    qkv, _, o, gu, d = lm.fast_weights().matrices(0)
    plain = [m.to(dt).contiguous() for m in (qkv, o, gu, d)]
    if not onednn.usable(lm.device, dt):
        print(f"  matrices: oneDNN packing unavailable here ({lm.device.type}, {dt}): skipped")
        return
    packed = [onednn.pack(m) for m in plain]
    print(f"  one layer's matmuls ({str(dt).removeprefix('torch.')}), plain F.linear vs oneDNN-packed:")
    for rows in (1, 16) if quick else (1, 4, 16, 64, 128):
        xs = {m.shape[1]: torch.randn(rows, m.shape[1], dtype=dt) for m in plain}
        t_plain, t_packed = alternate(lambda: [F.linear(xs[m.shape[1]], m) for m in plain],
                                       lambda: [onednn.linear(xs[m.shape[1]], m) for m in packed],
                                       reps=3 if quick else 10, rounds=2 if quick else 5)
        print(f"    {rows:4d} rows: plain {t_plain * 1e6:8.1f} us, packed {t_packed * 1e6:8.1f} us"
              f"   {t_plain / t_packed:.2f}x")


def _attention(lm, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    from app.inference.fastllama import _decode_attention

    w = lm.fast_weights()
    H, KV, D, dt = w.n_heads, w.n_kv, w.head_dim, w.dtype
    width = 200
    auto = "SDPA" if w.sdpa_decode else "the two matmuls"
    print(f"  decode attention, {width} cached positions per row, one layer: SDPA vs two float32 matmuls"
          f" (INFERQL_DECODE_ATTENTION=auto takes {auto} here):")
    for rows in (1, 16) if quick else (1, 16, 64):
        q = torch.randn(rows, H, 1, D)
        keys = torch.randn(rows, KV, width, D).to(dt)
        values = torch.randn(rows, KV, width, D).to(dt)
        ends = torch.randint(width // 2, width, (rows,))
        hidden = torch.arange(width)[None, :] > ends[:, None]
        allowed = ~hidden[:, None, None]
        add = torch.zeros(rows, 1, 1, width).masked_fill_(hidden[:, None, None], float("-inf"))
        add = add.expand(rows, KV, H // KV, width).reshape(-1, H // KV, width)
        t_sdpa, t_mm = alternate(
            lambda: F.scaled_dot_product_attention(q.to(dt), keys, values, attn_mask=allowed, scale=w.sm_scale,
                                                   enable_gqa=KV != H),
            lambda: _decode_attention(q, keys, values, add, w.sm_scale),
            reps=5 if quick else 50, rounds=2 if quick else 5)
        print(f"    {rows:4d} rows: SDPA {t_sdpa * 1e6:8.1f} us, two matmuls {t_mm * 1e6:8.1f} us"
              f"   {t_sdpa / t_mm:.2f}x")


def _one_pool(lm, quick: bool) -> None:
    import torch

    steps = 6 if quick else 20

    def decode_ms(rows: int) -> float:
        return _decode_ms(lm.fast_weights(), rows, steps)

    def with_second_pool(fn):
        ready, done = threading.Event(), threading.Event()

        def other() -> None:
            torch.randn(1 << 20).sum()  # a parallel op: this thread now keeps an OpenMP pool
            ready.set()
            done.wait()

        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        ready.wait()
        try:
            return fn()
        finally:
            done.set()
            thread.join()

    print("  a decode step on this thread, alone and beside a second thread's OpenMP pool:")
    for rows in (1, 16):
        alone, beside = [], []
        for _ in range(1 if quick else 3):
            alone.append(decode_ms(rows))
            beside.append(with_second_pool(lambda: decode_ms(rows)))
        a, b = statistics.median(alone), statistics.median(beside)
        print(f"    {rows:4d} rows: alone {a:7.1f} ms, beside a second pool {b:7.1f} ms   {b / a:.2f}x")


def _decode_ms(weights, rows: int, steps: int) -> float:
    """Median time of a decode step of `rows` rows, 60 cached positions each."""
    import torch

    from app.inference.fastllama import FastLlama

    fast = FastLlama(weights, rows)
    prompt = list(range(100, 160))
    with torch.inference_mode():
        for r in range(rows):
            fast.prefill(r, prompt, 0, logits=False)
        tokens, times = torch.full((rows,), 200), []
        for _ in range(steps):
            fast.lengths[:rows] = [len(prompt)] * rows  # every step writes the same column
            t = time.perf_counter()
            fast.decode(tokens, torch.full((rows,), len(prompt)))
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


def _float16_matrices(lm, quick: bool) -> None:
    import torch

    from app.inference import fbgemm, onednn
    from app.inference.fastllama import FastWeights

    if lm.dtype != torch.float32 or not fbgemm.usable(lm.device, lm.dtype):
        print(f"  float16 matrices: not for this model here ({lm.device.type}, {lm.dtype}): skipped")
        return
    packed = onednn.usable(lm.device, torch.float32)
    dense = FastWeights(lm.model, torch.float32, lm.device, packed=packed)
    half = FastWeights(lm.model, torch.float32, lm.device, half=True)
    print(f"  a decode step (int8 copies off), {'packed' if packed else 'plain'} float32 matrices vs float16"
          f" (fbgemm{', the head in int8' if type(half.head) is fbgemm.Int8Head else ''}):")
    for rows in (1, 16) if quick else (1, 4, 16, 64):
        a, b = [], []
        for _ in range(1 if quick else 3):
            a.append(_decode_ms(dense, rows, 6 if quick else 12))
            b.append(_decode_ms(half, rows, 6 if quick else 12))
        ta, tb = statistics.median(a), statistics.median(b)
        print(f"    {rows:4d} rows: float32 {ta:7.1f} ms, float16 {tb:7.1f} ms   {ta / tb:.2f}x")


def _native_step(lm, quick: bool) -> None:
    from app.inference import fbgemm, int8, native, onednn
    from app.inference.fastllama import FastWeights

    if not native.usable(lm.device, lm.dtype):
        print(f"  native step: not for this model here ({lm.device.type}, {lm.dtype}): skipped")
        return
    try:
        native.library()
    except (RuntimeError, OSError) as exc:
        print(f"  native step: unavailable ({exc}): skipped")
        return
    # dense: the matrices the server's bigger steps take (float16 ones where fbgemm runs them)
    half = fbgemm.usable(lm.device, lm.dtype)
    packed = onednn.usable(lm.device, lm.dtype) and not half
    dense = FastWeights(lm.model, lm.dtype, lm.device, packed=packed, half=half)
    through_torch = FastWeights(lm.model, lm.dtype, lm.device, packed=packed)
    through_torch.add_int8(int8.ON_ROWS)
    natively = FastWeights(lm.model, lm.dtype, lm.device, packed=packed)
    natively.add_int8(native.auto_rows(lm.dtype))
    natively.add_native()
    form = "float16 (fbgemm)" if half else "packed" if packed else "plain"
    print(f"  a decode step ({str(lm.dtype).removeprefix('torch.')}): dense = {form} matrices,"
          " torch's int8 op, the native step over the same int8 copies:")
    # 8 and 16 rows: the blocked products (from native.blocked_from() rows), or AMX's tiles
    # (from native.amx_from() rows, a bfloat16 model: then 32 and 64 rows too); torch's int8
    # op is not used past int8.ON_ROWS rows
    wide = tuple(r for r in (8, 16, 32, 64) if r <= natively.int8_rows) if not quick else ()
    for rows in ((1, 4) if quick else (1, 2, 4)) + wide:
        ways = (dense, through_torch, natively) if rows <= int8.ON_ROWS else (dense, natively)
        times: list[list[float]] = [[] for _ in ways]
        for _ in range(1 if quick else 3):
            for t, w in zip(times, ways):
                t.append(_decode_ms(w, rows, 6 if quick else 12))
        a, *b, c = (statistics.median(t) for t in times)
        if b:
            print(f"    {rows:4d} rows: dense {a:7.1f} ms, int8 op {b[0]:7.1f} ms, native {c:7.1f} ms"
                  f"   {a / c:.2f}x, {b[0] / c:.2f}x")
        else:
            print(f"    {rows:4d} rows: dense {a:7.1f} ms, native {c:7.1f} ms"
                  f" ({'AMX tiles' if native.on_tiles(rows, lm.dtype) else 'blocked products'})   {a / c:.2f}x")


def kernels_section(lm, quick: bool = False) -> None:
    import torch

    from app.inference.threads import in_passing_thread

    print(f"kernels ({torch.get_num_threads()} torch threads; best times, the two alternating):", flush=True)

    def run() -> None:
        _matrices(lm, quick)
        _attention(lm, quick)
        _one_pool(lm, quick)
        _native_step(lm, quick)
        _float16_matrices(lm, quick)

    in_passing_thread(run)
