"""Zero-shot classification with the real SmolLM2-135M-Instruct (the model's quality matters here)."""

from __future__ import annotations

import math

import pytest

from app.inference.classify import score_labels
from app.inference.model import load_model

POSITIVE = "I absolutely love this product, it works perfectly and I would buy it again!"
NEGATIVE = "This is the worst purchase I have ever made: it broke after one day and support ignored me. Terrible."


@pytest.fixture(scope="module")
def real_lm(real_model_dir):
    return load_model(real_model_dir, device="cpu")


def _check_distribution(scored, labels):
    assert [s.label for s in scored.scores] == labels  # in the order given
    assert sum(s.probability for s in scored.scores) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= s.probability <= 1.0 for s in scored.scores)
    assert all(s.logprob <= 0.0 for s in scored.scores)
    # probabilities are the softmax of the labels' log-likelihoods
    z = sum(math.exp(s.logprob) for s in scored.scores)
    for s in scored.scores:
        assert s.probability == pytest.approx(math.exp(s.logprob) / z, rel=1e-4, abs=1e-9)


def test_positive_text(real_lm):
    labels = ["positive", "negative"]
    scored = score_labels(real_lm, POSITIVE, labels)
    _check_distribution(scored, labels)
    by = {s.label: s for s in scored.scores}
    assert by["positive"].probability > by["negative"].probability
    assert by["positive"].logprob > by["negative"].logprob
    assert scored.prompt_tokens > len(real_lm.encode_raw(POSITIVE))


def test_negative_text(real_lm):
    labels = ["positive", "negative"]
    scored = score_labels(real_lm, NEGATIVE, labels)
    _check_distribution(scored, labels)
    by = {s.label: s for s in scored.scores}
    assert by["negative"].probability > by["positive"].probability


def test_label_order_does_not_change_the_answer(real_lm):
    a = score_labels(real_lm, POSITIVE, ["positive", "negative"])
    b = score_labels(real_lm, POSITIVE, ["negative", "positive"])
    pa = {s.label: s.probability for s in a.scores}
    pb = {s.label: s.probability for s in b.scores}
    assert max(pa, key=pa.get) == max(pb, key=pb.get) == "positive"
    assert [s.label for s in b.scores] == ["negative", "positive"]


def test_right_padding_does_not_change_a_label_score(real_lm):
    """Scoring a label alongside a longer one gives the same log-likelihood as with a short one."""
    text = "The sky is blue."
    # A fixed instruction (no {labels}), so that the prompt is the same for both label sets.
    instruction = "Is the statement true? Answer yes or no."
    short = score_labels(real_lm, text, ["yes", "no"], instruction)
    padded = score_labels(real_lm, text, ["yes", "no, certainly not in any way whatsoever"], instruction)
    assert short.scores[0].logprob == pytest.approx(padded.scores[0].logprob, abs=1e-3)
    assert short.prompt_tokens < padded.prompt_tokens

