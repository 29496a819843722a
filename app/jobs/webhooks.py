"""Webhook delivery: signed per Standard Webhooks, retried with backoff, every attempt recorded.

Messages are rows in the `webhooks` table (written in the same transaction that ends
their job), so pending deliveries survive a restart: the dispatcher picks up every
PENDING row whose next attempt is due.

A webhook URL is chosen by a tenant, so an attempt is treated as hostile:

- **Destination.** The host is resolved once per attempt; unless
  INFERQL_WEBHOOK_ALLOW_PRIVATE is set, any address that is not public (loopback, private,
  link-local, cloud metadata, IPv4 inside IPv6...) refuses the attempt
  (BLOCKED_DESTINATION). The connection goes to the very address that was checked (no
  second lookup that DNS rebinding could answer differently) while the Host header, the
  TLS SNI and the certificate check keep the URL's host name. Redirects are not followed;
  proxies from the environment are not used.
- **Bounded attempts.** One deadline covers the whole attempt (resolve, connect, send,
  answer), so a receiver that trickles a byte at a time cannot hold a slot; at most
  `max_response_bytes` of its answer are read, then the connection is dropped.
- **Fair slots.** At most `max_parallel` attempts run at once, at most `max_per_owner` of
  them for one API key, and keys with due messages take turns: one tenant's slow
  receivers cannot hold up everyone else's webhooks.
- **Coarse outcomes.** What the job's owner sees (`webhookDeliveries`) is a DeliveryOutcome,
  the HTTP status and a fixed text: never exception text from this side's network.
- **Per-key secrets.** A message is signed with the secret of the key that owns its job or
  batch, so one tenant cannot forge another's webhooks; jobs made with auth off are signed
  with the server-wide secret.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from pydantic import SecretStr
from sqlalchemy import update
from sqlmodel import Session, col, func, select
from standardwebhooks import Webhook

from app.logs import bind_job

from . import metrics
from .domain import DeliveryOutcome
from .keys import ensure_webhook_secret
from .persistence.db import Database
from .persistence.rows import utc
from .persistence.tables import WebhookAttemptRow, WebhookRow
from .persistence.writer import Writer
from .webhook_secrets import secret_value
from .webhook_targets import (
    Resolver,
    exception_outcome,
    outcome_text,
    resolve_target,
    status_outcome,
    system_resolver,
)

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4096  # of a receiver's answer; the rest is never read
MAX_PER_OWNER = 2          # attempts at once for one API key


@dataclass(frozen=True)
class _Due:
    id: str
    owner: str | None
    attempts: int


class WebhookDispatcher:
    def __init__(
        self,
        db: Database,
        secret: str | SecretStr,
        retry_delays: list[float],
        timeout: float = 10.0,
        max_parallel: int = 8,
        writer: Writer | None = None,
        *,
        allow_private: bool = False,
        max_per_owner: int = MAX_PER_OWNER,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._db = db
        self._writer = writer or Writer(db)
        self._server_signer = Webhook(secret_value(secret))
        self._signers: dict[str, Webhook] = {}  # per key id
        self._delays = retry_delays
        self._timeout = timeout
        self._allow_private = allow_private
        self._max_parallel = max_parallel
        self._max_per_owner = max(1, min(max_per_owner, max_parallel))
        self._max_response_bytes = max_response_bytes
        self._resolver = resolver
        # No keep-alive: every attempt gets its own connection to its own checked address, and
        # a connection whose answer was cut short is dropped. No proxies from the environment.
        self._http = httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False, verify=verify,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            headers={"user-agent": "InferQL-Webhooks/1"},
        )
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task] = {}
        self._active: Counter[str | None] = Counter()      # attempts running per owner
        self._last_start: dict[str | None, float] = {}     # per owner: whose turn it is
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="webhook-dispatcher")
        self._wake.set()  # deliver whatever a previous process left pending

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                next_due = await self._dispatch_due()
            except Exception:
                log.exception("webhook dispatch pass failed")
                next_due = 5.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=next_due)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _dispatch_due(self) -> float:
        """Starts due deliveries while slots are free, owners taking turns; returns seconds
        until the next one is due (at most 60; an attempt that ends wakes the loop sooner)."""
        free = self._max_parallel - len(self._inflight)
        now = datetime.now(UTC)
        if free > 0:
            due = await self._db.read(lambda session: self._due(session, now), offload=True)
            queues: dict[str | None, list[_Due]] = {}
            for d in due:
                if d.id not in self._inflight:
                    queues.setdefault(d.owner, []).append(d)
            # Least recently served owner first, one message each per round.
            owners = sorted(queues, key=lambda o: self._last_start.get(o, 0.0))
            while free > 0 and owners:
                for owner in list(owners):
                    if free == 0:
                        break
                    if not queues[owner] or self._active[owner] >= self._max_per_owner:
                        owners.remove(owner)
                        continue
                    self._start(queues[owner].pop(0))
                    free -= 1
        next_at = await self._db.read(lambda session: session.exec(
            select(func.min(WebhookRow.next_attempt_at))
            .where(col(WebhookRow.state) == "PENDING", col(WebhookRow.next_attempt_at) > now)).one())
        wait = 60.0 if next_at is None else (utc(next_at) - now).total_seconds()
        return min(max(wait, 0.05), 60.0)

    def _due(self, session: Session, now: datetime) -> list[_Due]:
        """Due messages, oldest first: for each owner only the first few (a large backlog of
        one key is not read in full on every pass)."""
        turn = func.row_number().over(partition_by=WebhookRow.owner,
                                      order_by=(col(WebhookRow.next_attempt_at), col(WebhookRow.id))).label("turn")
        due = (select(WebhookRow.id, WebhookRow.owner, WebhookRow.attempts, WebhookRow.next_attempt_at, turn)
               .where(col(WebhookRow.state) == "PENDING", col(WebhookRow.next_attempt_at) <= now).subquery())
        rows = session.exec(select(due.c.id, due.c.owner, due.c.attempts)
                            .where(due.c.turn <= 2 * self._max_per_owner)
                            .order_by(due.c.next_attempt_at, due.c.id))
        return [_Due(*r) for r in rows]

    def _start(self, due: _Due) -> None:
        self._active[due.owner] += 1
        self._last_start[due.owner] = time.monotonic()
        if len(self._last_start) > 10_000:  # forget owners with nothing running
            self._last_start = {o: t for o, t in self._last_start.items() if self._active[o]}
        self._inflight[due.id] = asyncio.create_task(self._deliver(due), name=f"webhook-{due.id}")

    async def _deliver(self, due: _Due) -> None:
        try:
            await self._attempt(due)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook %s: delivery attempt crashed", due.id)
        finally:
            self._inflight.pop(due.id, None)
            self._active[due.owner] -= 1
            if self._active[due.owner] <= 0:
                del self._active[due.owner]
            self._wake.set()

    async def _claim(self, due: _Due) -> WebhookRow | None:
        """Takes the message for this attempt and returns it. A pass that read the row before
        an earlier attempt was recorded (or another process sharing the database) loses the
        claim. While the attempt runs the row is not due (a lease: if this process dies
        mid-attempt, the message is due again once the lease ends)."""
        lease = datetime.now(UTC) + timedelta(seconds=self._timeout + 30)

        def op(session: Session) -> WebhookRow | None:
            claimed = session.exec(
                update(WebhookRow)
                .where(col(WebhookRow.id) == due.id, col(WebhookRow.state) == "PENDING",
                       col(WebhookRow.attempts) == due.attempts)
                .values(attempts=due.attempts + 1, next_attempt_at=lease)
            )
            return session.get(WebhookRow, due.id) if claimed.rowcount == 1 else None

        return await self._writer.write(op)

    async def _signer(self, owner: str | None) -> Webhook:
        if owner is None:
            return self._server_signer
        signer = self._signers.get(owner)
        if signer is None:
            secret = await self._writer.write(lambda session: ensure_webhook_secret(session, owner))
            if secret is None:  # the key row is gone: nobody could verify it anyway
                log.warning("webhook owner %s has no key; signing with the server secret", owner)
                return self._server_signer
            signer = self._signers[owner] = Webhook(secret)
        return signer

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[DeliveryOutcome, int | None]:
        """One POST under one overall deadline; the outcome and the HTTP status (if one came)."""
        status = None
        try:
            async with asyncio.timeout(self._timeout):
                target = await resolve_target(url, allow_private=self._allow_private, resolver=self._resolver)
                async with self._http.stream("POST", target.url, content=body,
                                             headers={**headers, "host": target.host_header},
                                             extensions=target.extensions) as resp:
                    status = resp.status_code
                    read = 0
                    async for chunk in resp.aiter_raw():  # raw: a compressed answer is not inflated
                        read += len(chunk)
                        if read >= self._max_response_bytes:
                            break
        except Exception as exc:
            if status is not None:  # the answer's status came; only its body was cut short
                return status_outcome(status), status
            outcome = exception_outcome(exc)
            if outcome is DeliveryOutcome.INTERNAL_ERROR:
                log.exception("webhook to %s: unexpected failure", url)
            else:
                log.info("webhook to %s: %s (%s: %s)", url, outcome.value, type(exc).__name__, exc)
            return outcome, None
        return status_outcome(status), status

    async def _attempt(self, due: _Due) -> None:
        row = await self._claim(due)
        if row is None:
            return
        attempt = row.attempts
        if row.subject_type == "job":
            bind_job(row.subject_id)
        at = datetime.now(UTC)
        signer = await self._signer(row.owner)
        headers = {
            "content-type": "application/json",
            "webhook-id": row.id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signer.sign(row.id, at, row.payload_json),
        }
        outcome, status = await self._send(row.url, row.payload_json.encode(), headers)
        metrics.WEBHOOK_ATTEMPTS.labels(outcome.value).inc()
        delivered = outcome is DeliveryOutcome.HTTP_2XX
        error = outcome_text(outcome, status)
        next_at = None
        if not delivered and attempt <= len(self._delays):
            next_at = datetime.now(UTC) + timedelta(seconds=self._delays[attempt - 1])
        state = "DELIVERED" if delivered else ("PENDING" if next_at else "FAILED")

        def record(session: Session) -> None:
            session.add(WebhookAttemptRow(webhook_id=row.id, attempt=attempt, at=at, http_status=status,
                                          outcome=outcome.value, error=error, next_retry_at=next_at))
            db_row = session.get(WebhookRow, row.id)
            db_row.state, db_row.next_attempt_at = state, next_at

        await self._writer.write(record)
        if not delivered:
            log.warning("webhook %s to %s attempt %d failed (%s); %s", row.id, row.url, attempt, error,
                        f"retry at {next_at.isoformat()}" if next_at else "giving up")
