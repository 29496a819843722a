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


# Logits are [rows, positions, vocabulary] floats; rows are scored in chunks so that one
# request never holds more than about this many of them (~256 MB) at once.
MAX_LOGITS_PER_CHUNK = 64 * 1024 * 1024


def _prompt_and_answers(lm: LoadedModel, text: str, labels: list[str], instruction: str | None):
    system = (instruction or DEFAULT_INSTRUCTION).replace("{labels}", ", ".join(labels))
    prefix = lm.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": text}])
    end = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    return prefix, [lm.encode_text(label) + end for label in labels]


def classification_length(lm: LoadedModel, text: str, labels: list[str], instruction: str | None = None) -> int:
    """Tokens of the longest row (prompt + longest label): it must fit the context."""
    prefix, answers = _prompt_and_answers(lm, text, labels, instruction)
    return len(prefix) + max(len(a) for a in answers)


def score_labels(lm: LoadedModel, text: str, labels: list[str], instruction: str | None = None) -> Scored:
    """Runs forward passes; call it on the engine thread."""
    prefix, answers = _prompt_and_answers(lm, text, labels, instruction)
    width = len(prefix) + max(len(a) for a in answers)
    keep = width - len(prefix) + 1  # logits only from the last prompt position on
    vocab = lm.model.config.vocab_size
    chunk = max(1, MAX_LOGITS_PER_CHUNK // (keep * vocab))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    totals = []
    for start in range(0, len(answers), chunk):
        rows = answers[start:start + chunk]
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, answer in enumerate(rows):
            seq = prefix + answer
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                              logits_to_keep=keep).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, answer in enumerate(rows):
            # The token at prompt offset len(prefix) + j is predicted by kept logit j.
            positions = torch.arange(len(answer), device=logprobs.device)
            targets = torch.tensor(answer, device=logprobs.device)
            totals.append(logprobs[row, positions, targets].sum())
    totals_t = torch.stack(totals)
    probs = torch.softmax(totals_t, dim=0).tolist()
    return Scored(
        scores=tuple(LabelScore(l, p, lp) for l, p, lp in zip(labels, probs, totals_t.tolist())),
        prompt_tokens=len(prefix) + sum(len(a) for a in answers),
    )
