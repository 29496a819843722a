"""Input rules for generations and classifications. Each message names the limit crossed."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from .domain import GenerationSpec, JobOptions
from .errors import InvalidInput
from .persistence.cursors import BadCursor

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
    allow_private_webhooks: bool = False  # INFERQL_WEBHOOK_ALLOW_PRIVATE: for local development only


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


def validate_options(options: JobOptions, *, allow_private_webhooks: bool = False) -> None:
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
        validate_webhook_url(options.webhook_url, allow_private=allow_private_webhooks)


def validate_webhook_url(url: str, *, allow_private: bool = False) -> None:
    """Refuses what can never be delivered, and a literal address that is not public (unless
    `allow_private`: INFERQL_WEBHOOK_ALLOW_PRIVATE). A host name is checked when the
    webhook is sent, on the address it resolves to then: that check is the real defence."""
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
    address = ip_literal(parts.hostname)
    if address is not None and not allow_private and not is_public_address(address):
        raise _bad("`webhookUrl` must point to a public address (not loopback, private, link-local or "
                   "reserved)", "webhookUrl")


# ---- webhook destinations: which addresses a webhook may reach -----------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 ranges that carry an IPv4 address in their last 32 bits (checked as that IPv4 address).
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")      # RFC 6052
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")              # deprecated; also holds :: and ::1
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")    # RFC 2765 (SIIT)
# Not global, though this Python's ipaddress says they are.
_NOT_GLOBAL_V6 = (ipaddress.IPv6Network("64:ff9b:1::/48"),     # local-use NAT64, RFC 8215
                  ipaddress.IPv6Network("fec0::/10"))          # deprecated site-local
# Legacy IPv4 spellings that inet_aton (and so the resolver) accepts: 2130706433, 0x7f.1, 0177.0.0.1, 127.1
_LEGACY_IPV4 = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}")


def ip_literal(host: str) -> IPAddress | None:
    """The address a host names literally (every spelling the resolver accepts), else None."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address: never loopback, private, link-local,
    shared (CGNAT), multicast, reserved or documentation space, in IPv4 or IPv6, including
    IPv4 addresses carried inside IPv6 (mapped, compatible, translated, 6to4, NAT64)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _public_v4(ip)
    ip = ipaddress.IPv6Address(ip.packed)  # drop a %zone
    if ip.ipv4_mapped is not None:
        return _public_v4(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        return _public_v4(ip.sixtofour)
    if ip.teredo is not None:
        return False
    for net in (_NAT64_WELL_KNOWN, _IPV4_TRANSLATED):
        if ip in net:
            return _public_v4(ipaddress.IPv4Address(ip.packed[-4:]))
    if ip in _IPV4_COMPATIBLE or any(ip in net for net in _NOT_GLOBAL_V6):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_site_local or ip.is_private)


def check_page(first: int) -> None:
    if not 1 <= first <= MAX_PAGE:
        raise InvalidInput(f"`first` must be between 1 and {MAX_PAGE}", field="first")


@contextlib.contextmanager
def valid_cursor() -> Iterator[None]:
    """Reads a page: a cursor the API never handed out is the client's error."""
    try:
        yield
    except BadCursor:
        raise InvalidInput("`after` is not a cursor this API returned", field="after") from None
