"""Reports: what was used (for billing) and how webhooks went; read by Reviews, written
by the Classifier (generations record their usage as they end, in JobStore.finish)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import col, func, select

from ..domain import Usage, WebhookAttempt
from .db import Database
from .rows import to_attempt
from .tables import UsageRow, WebhookAttemptRow, WebhookRow
from .writer import Writer


@dataclass(frozen=True)
class UsageSummary:
    owner: str | None
    model_version: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class ReportStore:
    def __init__(self, db: Database, writer: Writer) -> None:
        self._db = db
        self._writer = writer

    async def record_usage(self, owner: str | None, kind: str, model_version: str, usage: Usage,
                           at: datetime) -> None:
        await self._writer.write(lambda session: session.add(UsageRow(
            owner=owner, kind=kind, model_version=model_version, at=at,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)))

    async def webhook_attempts(self, subject_id: str) -> list[WebhookAttempt]:
        query = (
            select(WebhookAttemptRow)
            .join(WebhookRow, col(WebhookRow.id) == col(WebhookAttemptRow.webhook_id))
            .where(col(WebhookRow.subject_id) == subject_id)
            .order_by(col(WebhookAttemptRow.at), col(WebhookAttemptRow.attempt))
        )
        return await self._db.read(lambda session: [to_attempt(r) for r in session.exec(query)])

    async def usage(self, start: datetime, end: datetime, *, owner: str | None, all_owners: bool) -> list[UsageSummary]:
        """Requests and tokens in [start, end), per owner and model version."""
        query = (
            select(UsageRow.owner, UsageRow.model_version, func.count(),
                   func.sum(UsageRow.prompt_tokens), func.sum(UsageRow.completion_tokens))
            .where(col(UsageRow.at) >= start, col(UsageRow.at) < end)
            .group_by(UsageRow.owner, UsageRow.model_version)
            .order_by(UsageRow.owner, UsageRow.model_version)
        )
        if not all_owners:
            query = query.where(col(UsageRow.owner) == owner)
        return await self._db.read(  # an aggregate over a time range can be long: off the loop
            lambda session: [UsageSummary(o, v, n, int(p or 0), int(c or 0)) for o, v, n, p, c in session.exec(query)],
            offload=True,
        )
