"""A result's stored form: field by field, the same dict as the generic conversion gave."""

from __future__ import annotations

import math
from dataclasses import asdict

from app.inference.types import FinishReason, ModelInfo, TokenAlternative
from app.jobs.domain import GenerationResult, TokenRecord
from app.jobs.results import build_result


def result(tokens: int) -> GenerationResult:
    records = [TokenRecord(i, 1000 + i, f" w{i}", -0.01 * i, tuple(TokenAlternative(2000 + j, f" a{j}", -1.0 - j)
                                                                 for j in range(i % 4)), 1_700_000_000.0 + i, i + 3)
               for i in range(tokens)]
    model = ModelInfo("SmolLM2-135M-Instruct", "a672150fb4f9", 134_515_008, "bfloat16", "cpu", 8192, "pypi")
    return build_result(tokens=records, reason=FinishReason.LENGTH, model=model, prompt_tokens=30,
                        created=1_699_999_990.0, started=1_699_999_995.0, finished=1_700_000_200.0,
                        review_threshold=0.5)


def generic(r: GenerationResult) -> dict:
    """What to_dict gave before: asdict, then the reason's value and the compact tokens."""
    d = asdict(r)
    d["finish_reason"] = r.finish_reason.value
    d["tokens"] = [t.to_dict() for t in r.tokens]
    return d


def test_the_dict_is_the_generic_one_key_for_key():
    for n in (0, 1, 128):
        r = result(n)
        assert list(r.to_dict()) == list(generic(r))
        assert r.to_dict() == generic(r)


def test_the_dict_reads_back_as_the_same_result():
    r = result(17)
    back = GenerationResult.from_dict(r.to_dict())
    assert back == r and math.isclose(back.confidence.score, r.confidence.score)
