"""Zero-shot classification: score each label as the model's answer.

The text and the label list go into a chat prompt; each label (followed by the end of
the assistant's turn) is appended as the answer, and its log-likelihood is the sum of
its tokens' logprobs. All labels are scored in one right-padded forward pass (causal
attention never looks at the padding to the right of a row). The label distribution is
the softmax of those log-likelihoods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import LoadedModel

DEFAULT_INSTRUCTION = "Classify the text. Answer with exactly one of these labels: {labels}."


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    logprob: float  # log-likelihood of the label as the whole answer


@dataclass(frozen=True)
class Scored:
    scores: tuple[LabelScore, ...]  # in the order the labels were given
    prompt_tokens: int              # distinct tokens read: the prompt plus every label


def score_labels(lm: LoadedModel, text: str, labels: list[str], instruction: str | None = None) -> Scored:
    """Runs a forward pass; call it on the engine thread."""
    system = (instruction or DEFAULT_INSTRUCTION).replace("{labels}", ", ".join(labels))
    prefix = lm.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": text}])
    end = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    answers = [lm.encode_raw(label) + end for label in labels]
    width = len(prefix) + max(len(a) for a in answers)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(labels), width), pad, dtype=torch.long)
    mask = torch.zeros((len(labels), width), dtype=torch.long)
    for row, answer in enumerate(answers):
        seq = prefix + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.inference_mode():
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    totals = []
    for row, answer in enumerate(answers):
        # The token at position p is predicted by the logits at position p - 1.
        positions = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(answer), device=logprobs.device)
        targets = torch.tensor(answer, device=logprobs.device)
        totals.append(logprobs[row, positions, targets].sum())
    totals_t = torch.stack(totals)
    probs = torch.softmax(totals_t, dim=0).tolist()
    return Scored(
        scores=tuple(LabelScore(l, p, lp) for l, p, lp in zip(labels, probs, totals_t.tolist())),
        prompt_tokens=len(prefix) + sum(len(a) for a in answers),
    )
