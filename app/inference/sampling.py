"""Choose the next token per row and report the model's own probabilities.

Logprobs always come from the raw logits (softmax without temperature or top-p), so
the same text gets the same confidence whichever sampler produced it. Sampling then
uses a per-request torch.Generator: the same seed and input give the same output,
whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import SamplingParams


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: float
    alternatives: tuple[tuple[int, float], ...]


# Below this, dividing logits by the temperature overflows float32: such a sampler is
# greedy in all but name, so it is run as greedy.
MIN_TEMPERATURE = 1e-3


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """None means greedy."""
    if params.temperature < MIN_TEMPERATURE:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def _sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    scaled = logits / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        sorted_logits[drop] = float("-inf")
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def choose(logits: torch.Tensor, rows: list[tuple[SamplingParams, torch.Generator | None]]) -> list[Choice]:
    """logits: [rows, vocab] raw scores of the last position of each row.

    Vectorized over the batch: a logprob is the logit minus its row's logsumexp (no [rows,
    vocab] log-softmax is written), and the greedy choices and their logprobs come back to
    Python in one transfer (one device sync on a GPU)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [rows]
    best, greedy = logits.max(dim=-1)
    top_k = max((p.alternatives for p, _ in rows), default=0)
    if top_k:
        top_vals, top_ids = logits.topk(top_k, dim=-1)
        top_vals, top_ids = (top_vals - lse[:, None]).tolist(), top_ids.tolist()
    sampled = [i for i, (_, gen) in enumerate(rows) if gen is not None]
    if not sampled:  # all greedy (ids < 2**24 are exact in float32)
        ids_f, chosen_lp = torch.stack([greedy.float(), best - lse]).tolist()
        chosen = [int(t) for t in ids_f]
    else:
        chosen = greedy.tolist()
        for i in sampled:
            params, gen = rows[i]
            chosen[i] = _sample_row(logits[i], params, gen)
        picked = torch.tensor(chosen, device=logits.device)[:, None]
        chosen_lp = (logits.gather(1, picked).squeeze(1) - lse).tolist()
    out = []
    for i, (params, _) in enumerate(rows):
        alts: tuple[tuple[int, float], ...] = ()
        if params.alternatives:
            k = params.alternatives
            alts = tuple(zip(top_ids[i][:k], top_vals[i][:k]))
        out.append(Choice(chosen[i], chosen_lp[i], alts))
    return out
