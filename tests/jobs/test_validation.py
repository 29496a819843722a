"""app/jobs/validation.py: every rule rejects with BAD_USER_INPUT and a message naming the limit."""

from __future__ import annotations

import re

import pytest

from app.inference.types import SamplingParams
from app.jobs.domain import ChatMessage, GenerationSpec
from app.jobs.errors import InvalidInput
from app.jobs.validation import (
    MAX_ALTERNATIVES,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_MESSAGES,
    MAX_SEED,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    Limits,
    validate_classification,
    validate_context,
    validate_generation,
)

LIMITS = Limits(max_prompt_chars=1000, max_new_tokens=256, context_length=2048)


def spec(prompt="Hello", messages=None, raw=False, **sampling) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, messages=messages, sampling=SamplingParams(**sampling), raw=raw)


def chat(*contents: str) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage("user", c) for c in contents)


def rejects(fn, *args, match: str, field: str | None = None) -> InvalidInput:
    with pytest.raises(InvalidInput, match=match) as info:
        fn(*args)
    err = info.value
    assert err.code == "BAD_USER_INPUT"
    assert err.message == str(err)
    if field is not None:
        assert err.extensions == {"field": field}
    return err


# ---- generation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good",
    [
        spec(),
        spec(prompt=None, messages=chat("hi")),
        spec(prompt=None, messages=(ChatMessage("system", ""), ChatMessage("user", "hi"))),
        spec(prompt="x" * LIMITS.max_prompt_chars),
        spec(max_tokens=1),
        spec(max_tokens=LIMITS.max_new_tokens),
        spec(temperature=0.0),
        spec(temperature=2.0, top_p=1.0),
        spec(top_p=1e-6),
        spec(alternatives=0),
        spec(alternatives=MAX_ALTERNATIVES),
        spec(seed=0),
        spec(seed=MAX_SEED),
        spec(stop=("a" * MAX_STOP_LENGTH,) * MAX_STOP_SEQUENCES),
        spec(raw=True),
    ],
)
def test_valid_generation_passes(good):
    assert validate_generation(good, LIMITS) is None


def test_prompt_and_messages_exactly_one():
    rejects(validate_generation, spec(messages=chat("hi")), LIMITS, match="exactly one of `prompt` or `messages`", field="prompt")
    rejects(validate_generation, spec(prompt=None), LIMITS, match="exactly one of `prompt` or `messages`", field="prompt")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(prompt):
    rejects(validate_generation, spec(prompt=prompt), LIMITS, match="`prompt` must not be empty", field="prompt")


def test_messages_empty_list():
    rejects(validate_generation, spec(prompt=None, messages=()), LIMITS, match="at least one message", field="messages")


def test_messages_all_blank():
    rejects(validate_generation, spec(prompt=None, messages=chat("", "  ")), LIMITS, match="must not all be empty", field="messages")


def test_too_many_messages():
    err = rejects(
        validate_generation, spec(prompt=None, messages=chat(*["m"] * (MAX_MESSAGES + 1))), LIMITS,
        match=f"{MAX_MESSAGES + 1} messages; the limit is {MAX_MESSAGES}", field="messages",
    )
    assert str(MAX_MESSAGES) in err.message
    validate_generation(spec(prompt=None, messages=chat(*["m"] * MAX_MESSAGES)), LIMITS)


def test_raw_with_messages():
    rejects(validate_generation, spec(prompt=None, messages=chat("hi"), raw=True), LIMITS, match="`raw` applies to `prompt` only", field="raw")


def test_prompt_chars_over_limit():
    n = LIMITS.max_prompt_chars + 1
    rejects(validate_generation, spec(prompt="x" * n), LIMITS, match=f"is {n} characters; the limit is {LIMITS.max_prompt_chars}", field="prompt")


def test_message_chars_over_limit_counts_all_messages():
    half = LIMITS.max_prompt_chars // 2
    msgs = chat("a" * half, "b" * half, "c")
    rejects(validate_generation, spec(prompt=None, messages=msgs), LIMITS, match=f"the limit is {LIMITS.max_prompt_chars}", field="prompt")


@pytest.mark.parametrize("n", [0, -1])
def test_max_tokens_below_one(n):
    rejects(validate_generation, spec(max_tokens=n), LIMITS, match="`maxTokens` must be at least 1", field="maxTokens")


def test_max_tokens_over_limit():
    n = LIMITS.max_new_tokens + 1
    rejects(validate_generation, spec(max_tokens=n), LIMITS, match=f"`maxTokens` is {n}; the limit is {LIMITS.max_new_tokens}", field="maxTokens")


@pytest.mark.parametrize("t", [-0.01, 2.01, float("nan"), float("inf"), float("-inf")])
def test_temperature_out_of_range(t):
    rejects(validate_generation, spec(temperature=t), LIMITS, match="`temperature` must be between 0 and 2", field="temperature")


@pytest.mark.parametrize("p", [0.0, -0.5, 1.0001, float("nan"), float("inf")])
def test_top_p_out_of_range(p):
    rejects(validate_generation, spec(top_p=p), LIMITS, match=re.escape("`topP` must be in (0, 1]"), field="topP")


@pytest.mark.parametrize("k", [MAX_ALTERNATIVES + 1, -1])
def test_alternatives_out_of_range(k):
    rejects(validate_generation, spec(alternatives=k), LIMITS, match=f"between 0 and {MAX_ALTERNATIVES}", field="alternatives")


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_seed_out_of_range(seed):
    rejects(validate_generation, spec(seed=seed), LIMITS, match=f"`seed` must be between 0 and {MAX_SEED}", field="seed")


def test_too_many_stop_strings():
    n = MAX_STOP_SEQUENCES + 1
    stops = tuple(f"s{i}" for i in range(n))
    rejects(validate_generation, spec(stop=stops), LIMITS, match=f"holds {n} strings; the limit is {MAX_STOP_SEQUENCES}", field="stop")


@pytest.mark.parametrize("bad", ["", "x" * (MAX_STOP_LENGTH + 1)])
def test_bad_stop_string(bad):
    rejects(validate_generation, spec(stop=("ok", bad)), LIMITS, match=f"1 to {MAX_STOP_LENGTH} characters", field="stop")


def test_first_broken_rule_is_reported():
    # Several rules broken: the message is about the prompt, checked first.
    rejects(validate_generation, spec(prompt="", max_tokens=0, temperature=9), LIMITS, match="`prompt` must not be empty")


# ---- context -------------------------------------------------------------------------------


def test_validate_context():
    assert validate_context(2000, 48, 2048) is None  # exactly the window: allowed
    err = rejects(validate_context, 2000, 49, 2048, match="context length of 2048 tokens", field="maxTokens")
    assert "prompt (2000 tokens)" in err.message and "maxTokens (49)" in err.message
    rejects(validate_context, 3000, 1, 2048, match="exceeds the model's context length")


# ---- classification ------------------------------------------------------------------------


def test_valid_classification_passes():
    assert validate_classification("great stuff", ["positive", "negative"], None, LIMITS) is None
    labels = [f"l{i}" for i in range(MAX_LABELS)]
    assert validate_classification("t", labels, "Pick one of {labels}.", LIMITS) is None
    assert validate_classification("t", ["a" * MAX_LABEL_CHARS, "b"], None, LIMITS) is None


@pytest.mark.parametrize("labels", [[], ["only"]])
def test_fewer_than_two_labels(labels):
    rejects(validate_classification, "text", labels, None, LIMITS, match="at least 2 `labels`", field="labels")


def test_too_many_labels():
    labels = [f"l{i}" for i in range(MAX_LABELS + 1)]
    rejects(validate_classification, "text", labels, None, LIMITS, match=f"{MAX_LABELS + 1} labels; the limit is {MAX_LABELS}", field="labels")


def test_duplicate_labels():
    rejects(validate_classification, "text", ["yes", "no", "yes"], None, LIMITS, match="must not repeat a label", field="labels")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text(text):
    rejects(validate_classification, text, ["a", "b"], None, LIMITS, match="`text` must not be empty", field="text")


@pytest.mark.parametrize("bad", ["", "  ", "x" * (MAX_LABEL_CHARS + 1)])
def test_bad_label(bad):
    rejects(validate_classification, "text", ["a", bad], None, LIMITS, match=f"1 to {MAX_LABEL_CHARS} characters", field="labels")


def test_classification_text_plus_instruction_over_limit():
    half = LIMITS.max_prompt_chars // 2
    validate_classification("t" * half, ["a", "b"], "i" * half, LIMITS)
    rejects(
        validate_classification, "t" * half, ["a", "b"], "i" * (half + 1), LIMITS,
        match=f"the limit is {LIMITS.max_prompt_chars} characters", field="text",
    )
