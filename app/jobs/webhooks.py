"""Webhook delivery: signed per Standard Webhooks, retried with backoff, every attempt recorded.

Messages are rows in the `webhooks` table (written in the same transaction that ends
their job), so pending deliveries survive a restart: the dispatcher simply picks up
every PENDING row whose next attempt is due.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import update
from sqlmodel import Session, col, select
from standardwebhooks import Webhook

from .db import Database
from .tables import WebhookAttemptRow, WebhookRow
from .writer import Writer

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"


def load_or_create_secret(data_dir: Path) -> str:
    """The signing secret kept in data_dir, created (0600) on first use."""
    path = data_dir / SECRET_FILE
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def _utc(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


class WebhookDispatcher:
    def __init__(
        self,
        db: Database,
        secret: str,
        retry_delays: list[float],
        timeout: float = 10.0,
        max_parallel: int = 8,
        writer: Writer | None = None,
    ) -> None:
        self._db = db
        self._writer = writer or Writer(db)
        self._signer = Webhook(secret)
        self._delays = retry_delays
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                       headers={"user-agent": "InferQL-Webhooks/1"})
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_parallel)
        self._inflight: set[str] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="webhook-dispatcher")
        self._wake.set()  # deliver whatever a previous process left pending

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
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
        """Starts every due delivery; returns seconds until the next one is due (max 60)."""
        now = datetime.now(UTC)
        pending = select(WebhookRow).where(col(WebhookRow.state) == "PENDING").order_by(col(WebhookRow.next_attempt_at))
        rows = await self._db.read(lambda session: list(session.exec(pending)), offload=True)
        wait = 60.0
        for row in rows:
            due = _utc(row.next_attempt_at) or now
            if due > now:
                wait = min(wait, (due - now).total_seconds())
                continue
            if row.id not in self._inflight:
                self._inflight.add(row.id)
                asyncio.create_task(self._deliver(row))
        return max(wait, 0.05)

    async def _deliver(self, row: WebhookRow) -> None:
        try:
            async with self._slots:
                await self._attempt(row)
        except Exception:
            log.exception("webhook %s: delivery attempt crashed", row.id)
        finally:
            self._inflight.discard(row.id)
            self._wake.set()

    async def _claim(self, row: WebhookRow) -> bool:
        """Takes the message for this attempt. A pass that read the row before an earlier
        attempt was recorded (or another process sharing the database) loses the claim."""

        def op(session: Session) -> bool:
            claimed = session.exec(
                update(WebhookRow)
                .where(col(WebhookRow.id) == row.id, col(WebhookRow.state) == "PENDING",
                       col(WebhookRow.attempts) == row.attempts)
                .values(attempts=row.attempts + 1)
            )
            return claimed.rowcount == 1

        return await self._writer.write(op)

    async def _attempt(self, row: WebhookRow) -> None:
        if not await self._claim(row):
            return
        attempt = row.attempts + 1
        at = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": row.id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._signer.sign(row.id, at, row.payload_json),
        }
        status, error = None, None
        try:
            resp = await self._http.post(row.url, content=row.payload_json.encode(), headers=headers)
            status = resp.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except Exception as exc:  # any failure is a failed attempt, retried like the others
            error = f"{type(exc).__name__}: {exc}"[:500]
        delivered = error is None
        next_at = None
        if not delivered and attempt <= len(self._delays):
            next_at = at + timedelta(seconds=self._delays[attempt - 1])
        state = "DELIVERED" if delivered else ("PENDING" if next_at else "FAILED")

        def record(session: Session) -> None:
            session.add(WebhookAttemptRow(webhook_id=row.id, attempt=attempt, at=at, http_status=status,
                                          error=error, next_retry_at=next_at))
            db_row = session.get(WebhookRow, row.id)
            db_row.state, db_row.next_attempt_at = state, next_at

        await self._writer.write(record)
        if not delivered:
            log.warning("webhook %s to %s attempt %d failed (%s); %s", row.id, row.url, attempt, error,
                        f"retry at {next_at.isoformat()}" if next_at else "giving up")
