"""sampling.choose, confidence_from_logprobs, and jobs.results.build_result (no model)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from app.inference.confidence import confidence_from_logprobs
from app.inference.sampling import choose, make_generator
from app.inference.types import FinishReason, ModelInfo, SamplingParams
from app.jobs.domain import TokenRecord
from app.jobs.results import build_result

CPU = torch.device("cpu")
GREEDY = SamplingParams()


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _sampled(params: SamplingParams):
    return (params, make_generator(params, CPU))


# ---- choose --------------------------------------------------------------------------------


def test_make_generator_none_for_greedy():
    assert make_generator(SamplingParams(temperature=0.0, seed=3), CPU) is None
    assert isinstance(make_generator(SamplingParams(temperature=0.5, seed=3), CPU), torch.Generator)


def test_greedy_rows_return_argmax_and_raw_logprob():
    logits = _logits()
    choices = choose(logits, [(GREEDY, None)] * 3)
    lp = torch.log_softmax(logits, dim=-1)
    for row, c in enumerate(choices):
        assert c.token_id == int(logits[row].argmax())
        assert c.logprob == pytest.approx(float(lp[row, c.token_id]), abs=1e-6)
        assert c.logprob <= 0
        assert c.alternatives == ()


def test_sampled_logprob_is_the_unwarped_one():
    logits = _logits(rows=1, vocab=20)
    lp = torch.log_softmax(logits, dim=-1)[0]
    params = SamplingParams(temperature=1.7, top_p=0.9, seed=11)
    gen = make_generator(params, CPU)
    for _ in range(30):
        [c] = choose(logits, [(params, gen)])
        # Not the log of the temperature/top-p warped distribution: the model's own.
        assert c.logprob == pytest.approx(float(lp[c.token_id]), abs=1e-6)


def test_temperature_changes_the_distribution_not_the_reported_logprob():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    lp = torch.log_softmax(logits, dim=-1)[0]
    hot = SamplingParams(temperature=2.0, seed=0)
    gen = make_generator(hot, CPU)
    picks = Counter(choose(logits, [(hot, gen)])[0].token_id for _ in range(400))
    # At temperature 2 token 3 has probability ~0.10 (raw softmax gives ~0.03): it shows up.
    assert set(picks) == {0, 1, 2, 3}
    assert picks[0] > picks[3]
    for tid in picks:
        [c] = choose(logits, [(hot, make_generator(SamplingParams(temperature=2.0, seed=tid), CPU))])
        assert c.logprob == pytest.approx(float(lp[c.token_id]), abs=1e-6)


def test_same_seed_same_tokens_different_seed_differs():
    logits = _logits(rows=1, vocab=1000, seed=5) / 3  # flat-ish: many plausible tokens

    def draw(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        gen = make_generator(params, CPU)
        return [choose(logits, [(params, gen)])[0].token_id for _ in range(40)]

    a, b, c = draw(123), draw(123), draw(124)
    assert a == b
    assert a != c
    assert len(set(a)) > 5  # it really samples


def test_seeded_row_is_independent_of_batch_neighbours():
    logits = _logits(rows=3, vocab=200, seed=9)
    params = SamplingParams(temperature=1.0, seed=77)
    alone = []
    gen = make_generator(params, CPU)
    for _ in range(20):
        alone.append(choose(logits[1:2], [(params, gen)])[0].token_id)
    batched = []
    gen = make_generator(params, CPU)
    other = make_generator(SamplingParams(temperature=1.0, seed=1), CPU)
    for _ in range(20):
        rows = [(SamplingParams(temperature=1.0, seed=1), other), (params, gen), (GREEDY, None)]
        batched.append(choose(logits, rows)[1].token_id)
    assert alone == batched


def test_tiny_top_p_only_ever_picks_the_top_token():
    logits = _logits(rows=1, vocab=30, seed=2) / 3
    top = int(logits[0].argmax())
    params = SamplingParams(temperature=1.5, top_p=1e-4, seed=0)
    gen = make_generator(params, CPU)
    picks = {choose(logits, [(params, gen)])[0].token_id for _ in range(100)}
    assert picks == {top}


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # probabilities ~ [0.5, 0.3, 0.2]: top_p=0.7 keeps the first two tokens, never the third.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    gen = make_generator(params, CPU)
    picks = Counter(choose(logits, [(params, gen)])[0].token_id for _ in range(300))
    assert set(picks) == {0, 1}


def test_tiny_positive_temperature_behaves_like_greedy():
    logits = _logits(rows=1, vocab=50, seed=3)
    params = SamplingParams(temperature=1e-40, seed=1)
    [c] = choose(logits, [(params, make_generator(params, CPU))])
    assert c.token_id == int(logits[0].argmax())


def test_alternatives_are_topk_of_log_softmax():
    logits = _logits(rows=2, vocab=100, seed=4)
    lp = torch.log_softmax(logits, dim=-1)
    rows = [(SamplingParams(alternatives=5), None), (SamplingParams(alternatives=2), None)]
    choices = choose(logits, rows)
    for row, (c, k) in enumerate(zip(choices, [5, 2])):
        vals, ids = lp[row].topk(k)
        assert [a[0] for a in c.alternatives] == ids.tolist()
        assert [a[1] for a in c.alternatives] == pytest.approx(vals.tolist(), abs=1e-6)
        assert [a[1] for a in c.alternatives] == sorted((a[1] for a in c.alternatives), reverse=True)
        assert c.alternatives[0][0] == c.token_id  # greedy: the chosen token is the best one


def test_alternatives_only_for_rows_that_ask():
    logits = _logits(rows=2, vocab=100, seed=4)
    choices = choose(logits, [(SamplingParams(alternatives=3), None), (GREEDY, None)])
    assert len(choices[0].alternatives) == 3
    assert choices[1].alternatives == ()


# ---- confidence ----------------------------------------------------------------------------


def test_confidence_values():
    lps = [math.log(0.5), math.log(0.25), math.log(1.0)]
    c = confidence_from_logprobs(lps)
    mean = sum(lps) / 3
    assert c.mean_logprob == pytest.approx(mean)
    assert c.score == pytest.approx(math.exp(mean))
    assert c.score == pytest.approx((0.5 * 0.25 * 1.0) ** (1 / 3))  # geometric mean
    assert c.perplexity == pytest.approx(math.exp(-mean))
    assert c.perplexity == pytest.approx(1 / c.score)
    assert c.min_probability == pytest.approx(0.25)


def test_confidence_of_certain_answer_is_one():
    c = confidence_from_logprobs([0.0, 0.0])
    assert (c.score, c.perplexity, c.min_probability, c.mean_logprob) == (1.0, 1.0, 1.0, 0.0)


def test_confidence_empty_is_neutral():
    c = confidence_from_logprobs([])
    assert (c.score, c.mean_logprob, c.min_probability, c.perplexity) == (1.0, 0.0, 1.0, 1.0)


# ---- build_result --------------------------------------------------------------------------

MODEL = ModelInfo(
    id="m", version="abcdef012345", parameters=1, dtype="float32", device="cpu", context_length=512, source="local"
)


def _tokens(texts_lps: list[tuple[str, float]], t0: float) -> list[TokenRecord]:
    return [
        TokenRecord(index=i, token_id=100 + i, text=t, logprob=lp, alternatives=(), at=t0 + 0.1 * i)
        for i, (t, lp) in enumerate(texts_lps)
    ]


def test_build_result_text_usage_timing():
    created, started, finished = 1000.0, 1000.5, 1002.0
    tokens = _tokens([("Hel", -0.1), ("lo", -0.2), ("!", -0.3)], t0=1000.7)
    r = build_result(
        tokens=tokens, reason=FinishReason.LENGTH, model=MODEL, prompt_tokens=7,
        created=created, started=started, finished=finished, review_threshold=0.5,
    )
    assert r.text == "Hello!"
    assert r.finish_reason is FinishReason.LENGTH
    assert r.tokens == tuple(tokens)
    assert r.model == MODEL
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 3, 10)
    t = r.timing
    assert t.queued_ms == pytest.approx(500)
    assert t.time_to_first_token_ms == pytest.approx(700)
    assert t.generation_ms == pytest.approx(1500)
    assert t.total_ms == pytest.approx(2000)
    assert t.queued_ms <= t.time_to_first_token_ms <= t.total_ms
    assert t.tokens_per_second == pytest.approx(3 / 1.5)
    assert r.confidence.mean_logprob == pytest.approx(-0.2)
    assert r.confidence.score == pytest.approx(math.exp(-0.2))


def test_build_result_needs_review_against_threshold():
    tokens = _tokens([("a", math.log(0.6)), ("b", math.log(0.6))], t0=1.0)
    kw = dict(tokens=tokens, reason=FinishReason.STOP, model=MODEL, prompt_tokens=1,
              created=0.0, started=0.5, finished=2.0)
    assert build_result(**kw, review_threshold=0.5).needs_review is False
    assert build_result(**kw, review_threshold=0.7).needs_review is True


def test_build_result_blank_answer_needs_review():
    tokens = _tokens([("  ", 0.0), ("\n", 0.0)], t0=1.0)
    r = build_result(tokens=tokens, reason=FinishReason.STOP, model=MODEL, prompt_tokens=1,
                     created=0.0, started=0.5, finished=2.0, review_threshold=0.1)
    assert r.confidence.score == 1.0
    assert r.needs_review is True


def test_build_result_never_started():
    r = build_result(tokens=[], reason=FinishReason.CANCELLED, model=MODEL, prompt_tokens=0,
                     created=10.0, started=None, finished=13.0, review_threshold=0.5)
    assert r.text == ""
    assert r.usage.completion_tokens == 0
    assert r.timing.queued_ms == pytest.approx(3000)
    assert r.timing.total_ms == pytest.approx(3000)
    assert r.timing.generation_ms == 0
    assert r.timing.time_to_first_token_ms is None
    assert r.timing.tokens_per_second is None
    assert r.needs_review is True
    assert r.confidence.score == 1.0
