"""One-shot check of the inference engine on a GPU (or, with --device cpu, anywhere).

Needs torch and transformers only: it imports app.inference (the engine, the fast path,
the fidelity measure) and nothing of the API, the job layer or the settings. It carries
no weights: it builds a random-weight model with SmolLM2-135M's configuration (below),
saves it to a temporary folder and loads it the way the server does (load_model: the
device and the dtype `auto` picks, the fast path's weight copies), then prints

  (a) fidelity: the fast path against the float32 Hugging Face forward on fixed token
      prompts (teacher-forced greedy agreement, mean and max |d logprob|), and the
      engine's own greedy answers against the reference's;
  (b) the engine's aggregate tok/s and TTFT p50 at 1, 16 and 64 concurrent streams;
  (c) torch, CUDA and transformers versions and the device's name.

Run from the repository root:

    PYTHONPATH=. python3 scripts/cuda_check.py                 # the GPU, bfloat16 (auto)
    PYTHONPATH=. python3 scripts/cuda_check.py --device cpu --streams 1,4 --tokens 16

It exits 0 when every check passes, 1 otherwise (a failed check prints FAIL and why).
Where the chosen dtype is 16-bit, (a) also runs the fast path in float32, which must give
the reference's logprobs to rounding and its greedy answers exactly (the kernels and the
per-row cache on this device are right), while the 16-bit path is held to the bench's
tolerance (agreement >= 97 %, mean |d logprob| <= 0.05). Random weights (SmolLM2's own
initializer range) give flat logits: small logprob differences, but near-ties, so the
16-bit engine's free-running answers may part from the reference; where they part is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# SmolLM2-135M-Instruct's config.json, as transformers 5 writes it.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 49152,
}

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'}  {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def build_model_dir(out: Path, init_range: float, seed: int) -> None:
    """A random-weight SmolLM2-135M and a word-level tokenizer over its vocabulary ("t0" ...)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = dict(SMOLLM2_135M, initializer_range=init_range)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab = {**specials, **{f"t{i}": i for i in range(len(specials), config.vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(out)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


async def engine_greedy(lm, ids_list: list[list[int]], tokens: int) -> list[list[int]]:
    from app.inference.engine import Engine
    from app.inference.types import Finished, SamplingParams, TokenStep

    engine = Engine(lm, max_batch_size=len(ids_list))
    engine.start()
    try:
        async def one(ids):
            out = []
            async for step in engine.submit(ids, SamplingParams(max_tokens=tokens, temperature=0.0)):
                if isinstance(step, TokenStep):
                    out.append(step.token_id)
                elif isinstance(step, Finished):
                    if step.error:
                        raise RuntimeError(step.error)
            return out
        return list(await asyncio.gather(*(one(ids) for ids in ids_list)))
    finally:
        await engine.stop()


async def throughput(lm, streams: int, tokens: int, prompt_len: int, seed: int) -> tuple[float, float, int]:
    """`streams` generations at once: aggregate tok/s, TTFT p50 (ms), tokens received."""
    from app.inference.engine import Engine
    from app.inference.types import Finished, SamplingParams, TokenStep

    engine = Engine(lm, max_batch_size=max(streams, 1), max_waiting=max(64, streams))
    engine.start()
    try:
        async def one(ids, n):
            t0 = time.perf_counter()
            first, count = None, 0
            async for step in engine.submit(ids, SamplingParams(max_tokens=n, temperature=0.0)):
                if isinstance(step, TokenStep):
                    count += 1
                    first = first or time.perf_counter()
                elif isinstance(step, Finished):
                    if step.error:
                        raise RuntimeError(step.error)
            return (first - t0) * 1000 if first else float("nan"), count

        vocab = lm.tokenizer.vocab_size
        warm = prompts(streams, prompt_len, vocab, seed + 1)
        await asyncio.gather(*(one(ids, 4) for ids in warm))  # first kernels, allocations
        work = prompts(streams, prompt_len, vocab, seed + 2)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(ids, tokens) for ids in work))
        wall = time.perf_counter() - t0
    finally:
        await engine.stop()
    got = sum(c for _, c in results)
    return got / wall, statistics.median(t for t, _ in results), got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cuda | cpu")
    ap.add_argument("--dtype", default="auto", help="the fast path's dtype: auto | float32 | bfloat16 | float16")
    ap.add_argument("--streams", default="1,16,64", help="concurrent streams to time (default 1,16,64)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per stream (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    ap.add_argument("--fidelity-prompts", type=int, default=6)
    ap.add_argument("--fidelity-tokens", type=int, default=24)
    ap.add_argument("--init-range", type=float, default=0.02, help="the random weights' std (default 0.02)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()

    import torch
    import transformers

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda} (available: {torch.cuda.is_available()}),"
          f" transformers {transformers.__version__}, python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device 0: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB,"
              f" capability {props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}")
    print(f"CPU cores {os.cpu_count()}, torch threads {torch.get_num_threads()}", flush=True)

    from app.inference.fidelity import measure, reference_greedy
    from app.inference.model import EngineOptions, load_model, pick_device, pick_dtype

    print(f"the engine's choice here: device {pick_device('auto')}, dtype auto ->"
          f" {pick_dtype('auto', pick_device('auto'))}")
    with tempfile.TemporaryDirectory(prefix="inferql-cuda-check-") as tmp:
        t0 = time.perf_counter()
        build_model_dir(Path(tmp), args.init_range, args.seed)
        lm = load_model(Path(tmp), device=args.device, options=EngineOptions(dtype=args.dtype))
        lm32 = None
        if lm.info.dtype != "float32":
            lm32 = load_model(Path(tmp), device=args.device,
                              options=EngineOptions(dtype="float32", int8_small_batch="off"))
    weights = lm.fast_weights()
    print(f"model: random SmolLM2-135M config, {lm.info.parameters / 1e6:.0f}M parameters, built and loaded in"
          f" {time.perf_counter() - t0:.1f}s; device {lm.device}, dtype {lm.info.dtype},"
          f" {'fast path' if weights is not None else 'HF forward'}"
          f"{f', int8 decode up to {weights.int8_rows} rows' if weights is not None and weights.int8_rows else ''}",
          flush=True)
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        check(lm.device.type == "cuda", f"the engine runs on CUDA (device {lm.device})")
        if args.dtype == "auto":
            check(lm.info.dtype in ("bfloat16", "float16"), f"dtype auto on CUDA is 16-bit ({lm.info.dtype})")
    check(weights is not None, "the Llama fast path is on")

    # (a) fidelity
    print(f"\n(a) fidelity: {args.fidelity_prompts} prompts of {args.prompt_tokens} random tokens,"
          f" {args.fidelity_tokens} greedy tokens each, against the float32 HF forward", flush=True)
    vocab = lm.tokenizer.vocab_size
    fid_prompts = prompts(args.fidelity_prompts, args.prompt_tokens, vocab, args.seed)
    refs = [reference_greedy(lm.model, p, args.fidelity_tokens)[0] for p in fid_prompts]
    for model, exact in ([(lm32, True)] if lm32 is not None else []) + [(lm, lm.info.dtype == "float32")]:
        t0 = time.perf_counter()
        label = f"{model.info.dtype} fast path"
        if model.fast_weights() is not None:
            fid = measure(model, fid_prompts, args.fidelity_tokens)
            print(f"  {label}, teacher-forced: agreement {fid.agreement:.1%} over {fid.positions} positions,"
                  f" mean |d logprob| {fid.mean_abs_dlogprob:.5f}, max {fid.max_abs_dlogprob:.5f}")
            if exact:
                check(fid.agreement >= 0.99 and fid.mean_abs_dlogprob <= 1e-3,
                      f"{label}: the reference's logprobs to rounding (agreement >= 99 %, mean |d logprob| <= 0.001)")
            else:
                check(fid.agreement >= 0.97 and fid.mean_abs_dlogprob <= 0.05,
                      f"{label}: within the bench's tolerance (agreement >= 97 %, mean |d logprob| <= 0.05)")
        got = asyncio.run(engine_greedy(model, fid_prompts, args.fidelity_tokens))
        same = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
                for r, g in zip(refs, got)]
        print(f"  {label}, the engine's greedy answers ({len(fid_prompts)} batched) vs the reference's: identical"
              f" for {sum(s == len(r) for s, r in zip(same, refs))} of {len(refs)}; tokens in common before the"
              f" first difference {same} ({time.perf_counter() - t0:.1f}s)", flush=True)
        if exact:
            check(all(s == len(r) for s, r in zip(same, refs)), f"{label}: the engine's greedy answers are the reference's")
        else:  # a 16-bit path may part at a near-tie, not at once everywhere
            check(statistics.mean(same) >= args.fidelity_tokens / 2,
                  f"{label}: the engine's answers follow the reference for at least half their tokens on average")
    del lm32

    # (b) speed
    print(f"\n(b) the engine: {args.tokens} new tokens per stream, prompts of {args.prompt_tokens} tokens,"
          " all streams submitted at once", flush=True)
    for streams in sorted({int(s) for s in args.streams.split(",") if s.strip()}):
        t0 = time.perf_counter()
        tok_s, ttft, count = asyncio.run(throughput(lm, streams, args.tokens, args.prompt_tokens, args.seed))
        print(f"  {streams:>3} streams: {tok_s:8.1f} tok/s aggregate ({tok_s / streams:6.1f} per stream),"
              f" TTFT p50 {ttft:7.1f} ms, {count} tokens ({time.perf_counter() - t0:.1f}s with warm-up)", flush=True)
        check(count > 0 and tok_s > 0, f"{streams} streams produced tokens")
    if lm.device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    print(f"\n{'FAILED: ' + '; '.join(FAILURES) if FAILURES else 'all checks passed'}"
          f" ({time.perf_counter() - t_start:.0f}s)", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # an import or a run that breaks is a failed check too
        import traceback

        traceback.print_exc()
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
