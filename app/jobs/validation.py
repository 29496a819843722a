"""Input rules for generations and classifications. Each message names the limit crossed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from urllib.parse import urlsplit

import httpx

from .domain import GenerationSpec, JobOptions
from .errors import InvalidInput

MAX_ALTERNATIVES = 10
MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 100
MAX_MESSAGES = 256
MAX_LABELS = 50
MAX_LABEL_CHARS = 200
MAX_SEED = 2**63 - 1
MAX_BATCH_SIZE = 100
MAX_PAGE = 100
MAX_IDEMPOTENCY_KEY = 200
MAX_URL = 2048


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int
    max_new_tokens: int
    context_length: int


def _bad(message: str, field: str) -> InvalidInput:
    return InvalidInput(message, field=field)


def validate_generation(spec: GenerationSpec, limits: Limits) -> None:
    """Checks everything that does not need the tokenizer."""
    if (spec.prompt is None) == (spec.messages is None):
        raise _bad("give exactly one of `prompt` or `messages`", "prompt")
    if spec.prompt is not None:
        if not spec.prompt.strip():
            raise _bad("`prompt` must not be empty", "prompt")
        chars = len(spec.prompt)
    else:
        if not spec.messages:
            raise _bad("`messages` must hold at least one message", "messages")
        if len(spec.messages) > MAX_MESSAGES:
            raise _bad(f"`messages` holds {len(spec.messages)} messages; the limit is {MAX_MESSAGES}", "messages")
        if spec.raw:
            raise _bad("`raw` applies to `prompt` only", "raw")
        chars = sum(len(m.content) for m in spec.messages)
        if all(not m.content.strip() for m in spec.messages):
            raise _bad("`messages` must not all be empty", "messages")
    if chars > limits.max_prompt_chars:
        raise _bad(f"the prompt is {chars} characters; the limit is {limits.max_prompt_chars}", "prompt")
    s = spec.sampling
    if s.max_tokens < 1:
        raise _bad("`maxTokens` must be at least 1", "maxTokens")
    if s.max_tokens > limits.max_new_tokens:
        raise _bad(f"`maxTokens` is {s.max_tokens}; the limit is {limits.max_new_tokens}", "maxTokens")
    if not (math.isfinite(s.temperature) and 0.0 <= s.temperature <= 2.0):
        raise _bad("`temperature` must be between 0 and 2 (0 = greedy)", "temperature")
    if not (math.isfinite(s.top_p) and 0.0 < s.top_p <= 1.0):
        raise _bad("`topP` must be in (0, 1]", "topP")
    if not 0 <= s.alternatives <= MAX_ALTERNATIVES:
        raise _bad(f"`alternatives` must be between 0 and {MAX_ALTERNATIVES}", "alternatives")
    if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
        raise _bad(f"`seed` must be between 0 and {MAX_SEED}", "seed")
    if len(s.stop) > MAX_STOP_SEQUENCES:
        raise _bad(f"`stop` holds {len(s.stop)} strings; the limit is {MAX_STOP_SEQUENCES}", "stop")
    for stop in s.stop:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise _bad(f"each `stop` string must be 1 to {MAX_STOP_LENGTH} characters", "stop")


def validate_context(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    if prompt_tokens + max_tokens > context_length:
        raise _bad(
            f"prompt ({prompt_tokens} tokens) + maxTokens ({max_tokens}) exceeds the model's "
            f"context length of {context_length} tokens",
            "maxTokens",
        )


def validate_classification(text: str, labels: list[str], instruction: str | None, limits: Limits) -> None:
    if not text.strip():
        raise _bad("`text` must not be empty", "text")
    if len(text) + len(instruction or "") > limits.max_prompt_chars:
        raise _bad(f"`text` is too long; the limit is {limits.max_prompt_chars} characters", "text")
    if len(labels) < 2:
        raise _bad("give at least 2 `labels`", "labels")
    if len(labels) > MAX_LABELS:
        raise _bad(f"`labels` holds {len(labels)} labels; the limit is {MAX_LABELS}", "labels")
    if any(not label.strip() or len(label) > MAX_LABEL_CHARS for label in labels):
        raise _bad(f"each label must be 1 to {MAX_LABEL_CHARS} characters", "labels")
    if len(set(labels)) != len(labels):
        raise _bad("`labels` must not repeat a label", "labels")


def validate_options(options: JobOptions) -> None:
    if not -100 <= options.priority <= 100:
        raise _bad("`priority` must be between -100 and 100", "priority")
    if options.deadline_seconds is not None and not (
        math.isfinite(options.deadline_seconds) and 0 < options.deadline_seconds <= 86400
    ):
        raise _bad("`deadlineSeconds` must be in (0, 86400]", "deadlineSeconds")
    key = options.idempotency_key
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise _bad(f"`idempotencyKey` must be 1 to {MAX_IDEMPOTENCY_KEY} characters", "idempotencyKey")
    if options.webhook_url is not None:
        validate_webhook_url(options.webhook_url)


def validate_webhook_url(url: str) -> None:
    if len(url) > MAX_URL:
        raise _bad(f"`webhookUrl` is over {MAX_URL} characters", "webhookUrl")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise _bad("`webhookUrl` is not a valid URL", "webhookUrl") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad("`webhookUrl` must be an absolute http:// or https:// URL", "webhookUrl")
    if parts.username or parts.password:
        raise _bad("`webhookUrl` must not carry credentials", "webhookUrl")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise _bad("`webhookUrl` must not contain spaces or control characters", "webhookUrl")
    try:  # the client that will call it must be able to build the request
        httpx.Request("POST", url)
    except Exception:
        raise _bad("`webhookUrl` is not a URL that can be called", "webhookUrl") from None
