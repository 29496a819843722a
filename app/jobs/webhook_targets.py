"""Where one webhook attempt may connect, and how it ended, in coarse terms.

The host is resolved once per attempt; unless private targets are allowed, any address
that is not public refuses the attempt (BLOCKED_DESTINATION), and the connection goes to
the very address that was checked. What an owner sees of an attempt is a DeliveryOutcome,
the HTTP status and a fixed text: never exception text from this side's network.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from .domain import DeliveryOutcome
from .validation import IPAddress, ip_literal, is_public_address

Resolver = Callable[[str, int], Awaitable[list[str]]]


class Refused(Exception):
    """An attempt that ends before any connection, with this outcome."""

    def __init__(self, outcome: DeliveryOutcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


@dataclass(frozen=True)
class Target:
    """Where one attempt connects: the URL with its host replaced by the checked address."""

    url: httpx.URL
    host_header: str
    extensions: dict


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def resolve_target(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> Target:
    """Resolves the URL's host once and pins the attempt to the first address, after checking
    that every address it resolves to is public (unless allow_private)."""
    try:
        parsed = httpx.URL(url)
        request = httpx.Request("POST", parsed)
        host = parsed.raw_host.decode("ascii")
    except Exception:
        raise Refused(DeliveryOutcome.INVALID_URL) from None
    if parsed.scheme not in ("http", "https") or not host:
        raise Refused(DeliveryOutcome.INVALID_URL)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = ip_literal(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            found = await resolver(host, port)
            addresses = [ip_literal(a.split("%", 1)[0]) for a in found]
        except (OSError, UnicodeError):
            raise Refused(DeliveryOutcome.DNS_ERROR) from None
        if not addresses or None in addresses:
            raise Refused(DeliveryOutcome.DNS_ERROR)
    if not allow_private and not all(is_public_address(a) for a in addresses):
        raise Refused(DeliveryOutcome.BLOCKED_DESTINATION)
    pinned = parsed.copy_with(host=str(addresses[0]))
    # A name keeps its own TLS identity: SNI and the certificate are checked against it, not the address.
    extensions = {"sni_hostname": host} if parsed.scheme == "https" and literal is None else {}
    return Target(pinned, request.headers["host"], extensions)


def status_outcome(status: int) -> DeliveryOutcome:
    return {2: DeliveryOutcome.HTTP_2XX, 3: DeliveryOutcome.HTTP_3XX, 4: DeliveryOutcome.HTTP_4XX,
            5: DeliveryOutcome.HTTP_5XX}.get(status // 100, DeliveryOutcome.PROTOCOL_ERROR)


def _causes(exc: BaseException):
    """exc, its causes and contexts, and the members of exception groups among them."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def exception_outcome(exc: BaseException) -> DeliveryOutcome:
    if isinstance(exc, Refused):
        return exc.outcome
    causes = list(_causes(exc))
    if any(isinstance(e, (TimeoutError, httpx.TimeoutException)) for e in causes):
        return DeliveryOutcome.TIMEOUT
    if any(isinstance(e, ssl.SSLError) for e in causes):
        return DeliveryOutcome.TLS_ERROR
    if any(isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED
           for e in causes):
        return DeliveryOutcome.CONNECTION_REFUSED
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.LocalProtocolError)):
        return DeliveryOutcome.PROTOCOL_ERROR
    if isinstance(exc, (httpx.TransportError, OSError)):
        return DeliveryOutcome.CONNECTION_ERROR
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return DeliveryOutcome.INVALID_URL
    return DeliveryOutcome.INTERNAL_ERROR


_TEXT = {
    DeliveryOutcome.TIMEOUT: "timed out",
    DeliveryOutcome.CONNECTION_REFUSED: "connection refused",
    DeliveryOutcome.CONNECTION_ERROR: "connection failed",
    DeliveryOutcome.TLS_ERROR: "TLS handshake or certificate verification failed",
    DeliveryOutcome.DNS_ERROR: "the host name does not resolve",
    DeliveryOutcome.BLOCKED_DESTINATION: "the host is not a public address",
    DeliveryOutcome.PROTOCOL_ERROR: "the answer was not valid HTTP",
    DeliveryOutcome.INVALID_URL: "the URL cannot be called",
    DeliveryOutcome.INTERNAL_ERROR: "delivery failed",
}


def outcome_text(outcome: DeliveryOutcome, status: int | None) -> str | None:
    """The `error` an owner sees: fixed text per outcome (None when delivered)."""
    if outcome is DeliveryOutcome.HTTP_2XX:
        return None
    if status is not None:
        return f"HTTP {status}"
    return _TEXT[outcome]
