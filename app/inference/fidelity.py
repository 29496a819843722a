"""How far the fast path's numbers are from a float32 eager reference.

The reference is the model's own Hugging Face forward in float32 (the master weights the
fast path was built from). For each prompt the reference generates `tokens` greedy tokens;
the fast path is then fed the same tokens (teacher forcing: prefill of the prompt, then one
decode step per token, exactly the calls the engine makes), and at each position we compare

  * agreement: does the fast path's greedy choice equal the reference's token?
  * |d logprob|: the logprob the fast path gives the reference's token minus the reference's own.

Teacher forcing keeps one early near-tie from making every later position disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .fastllama import FastLlama
from .model import LoadedModel


@dataclass(frozen=True)
class Fidelity:
    positions: int
    agreement: float          # fraction of positions where both choose the same greedy token
    mean_abs_dlogprob: float
    max_abs_dlogprob: float


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their float32 logprobs from the Hugging Face forward."""
    cache = DynamicCache(config=model.config)
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt], device=dev)
    out_ids, out_lps = [], []
    for _ in range(tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(lp.argmax())
        out_ids.append(tok)
        out_lps.append(float(lp[tok]))
        ids = torch.tensor([[tok]], device=dev)
    return out_ids, out_lps


@torch.inference_mode()
def measure(lm: LoadedModel, prompts: list[list[int]], tokens: int = 32, batched: bool = False,
            refs: list[tuple[list[int], list[float]]] | None = None) -> Fidelity:
    """batched: the prompts decode together, one row each (steps of len(prompts) rows: the
    engine's path for that many concurrent streams, e.g. AMX tiles from 8 rows); else one at
    a time (1-row steps). refs: reference_greedy's answers for the prompts, if already known."""
    weights = lm.fast_weights()
    if weights is None:
        raise ValueError("the model does not run on the fast path")
    if refs is None:
        refs = [reference_greedy(lm.model, prompt, tokens) for prompt in prompts]
    rows = len(prompts) if batched else 1
    fast = FastLlama(weights, rows=rows)
    agree = total = 0
    diffs: list[float] = []
    for start in range(0, len(prompts), rows):
        group = range(start, min(start + rows, len(prompts)))
        fast.release_all()
        logits = torch.stack([fast.prefill(r, prompts[i], 0) for r, i in enumerate(group)])
        for step in range(tokens):
            lp = torch.log_softmax(logits, dim=-1)
            for r, i in enumerate(group):
                tok, ref_lp = refs[i][0][step], refs[i][1][step]
                agree += int(lp[r].argmax()) == tok
                total += 1
                diffs.append(abs(float(lp[r, tok]) - ref_lp))
            if step + 1 < tokens:
                toks = torch.tensor([refs[i][0][step] for i in group], device=lm.device)
                pos = torch.tensor([len(prompts[i]) + step for i in group], device=lm.device)
                logits = fast.decode(toks, pos)
    return Fidelity(total, agree / max(1, total), sum(diffs) / max(1, len(diffs)), max(diffs, default=0.0))
