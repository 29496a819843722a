"""Database tables (SQLModel). Only the store and the webhook dispatcher touch these.

Schema changes go through Alembic (app/jobs/persistence/migrations): edit a table here, then add a
migration that makes the same change.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, Text
from sqlmodel import Field, SQLModel


def _ts(nullable: bool = True, index: bool = False) -> Column:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created", "owner", "created_at"),
        Index("ix_jobs_review_queue", "needs_review", "review_verdict", "finished_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    owner: str | None = Field(default=None, max_length=64)  # the API key that submitted it
    batch_id: str | None = Field(default=None, index=True, max_length=36)
    batch_index: int | None = None
    status: str = Field(index=True, max_length=16)
    priority: int = 0
    input_json: str = Field(sa_column=Column(Text, nullable=False))
    # "<owner>:<key>", unique: the database itself refuses a second job for one key.
    idempotency_scope: str | None = Field(default=None, unique=True, max_length=300)
    webhook_url: str | None = Field(default=None, max_length=2048)
    deadline_at: datetime | None = Field(default=None, sa_column=_ts())
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(index=True))
    attempts: int = 0
    result_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Denormalised from the result, for batch sums, usage reports and the review queue.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    needs_review: bool = False
    review_verdict: str | None = Field(default=None, max_length=16)
    reviewed_by: str | None = Field(default=None, max_length=64)
    reviewed_at: datetime | None = Field(default=None, sa_column=_ts())
    corrected_text: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The PostgreSQL JobQueue's state (app/jobs/pg_queue.py); unused by the in-process queue.
    queue_tag: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # fair-queueing tag
    queue_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # arrival order
    prompt_ids_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    queue_held: bool = False  # holds a place of its owner's concurrency until `done`
    claimed_by: str | None = Field(default=None, max_length=64)  # the worker whose lease it is
    leased_until: datetime | None = Field(default=None, sa_column=_ts())


class BatchRow(SQLModel, table=True):
    __tablename__ = "batches"

    id: str = Field(primary_key=True, max_length=36)
    owner: str | None = Field(default=None, index=True, max_length=64)
    size: int
    webhook_url: str | None = Field(default=None, max_length=2048)
    cancelled: bool = False
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=_ts())


class WebhookRow(SQLModel, table=True):
    """One message to deliver (for a job or a batch), retried until delivered or given up."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_due", "state", "next_attempt_at"),)

    id: str = Field(primary_key=True, max_length=40)  # the `webhook-id` header: stable across retries
    subject_type: str = Field(max_length=8)  # job | batch
    subject_id: str = Field(index=True, max_length=36)
    event_type: str = Field(max_length=40)
    url: str = Field(max_length=2048)
    payload_json: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(max_length=12)  # PENDING | DELIVERED | FAILED
    # The API key that owns the job or batch: its secret signs the message, and deliveries
    # take turns between owners. None = made with auth off (the server-wide secret signs it).
    owner: str | None = Field(default=None, max_length=64)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_column=_ts())
    created_at: datetime = Field(sa_column=_ts(nullable=False))


class WebhookAttemptRow(SQLModel, table=True):
    __tablename__ = "webhook_attempts"

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: str = Field(index=True, max_length=40)
    attempt: int
    at: datetime = Field(sa_column=_ts(nullable=False))
    http_status: int | None = None
    outcome: str | None = Field(default=None, max_length=24)  # a DeliveryOutcome
    error: str | None = Field(default=None, max_length=500)  # coarse text for the outcome, never exception text
    next_retry_at: datetime | None = Field(default=None, sa_column=_ts())


class ApiKeyRow(SQLModel, table=True):
    """An API key, stored only as its sha256 (keys are 256-bit random, so no slow hash is needed)."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=36)
    name: str = Field(unique=True, max_length=100)
    key_hash: str = Field(unique=True, max_length=64)
    prefix: str = Field(max_length=16)  # the first characters, to recognise a key in a list
    admin: bool = False
    rpm: int | None = None           # requests per minute; None = the server default
    tpm: int | None = None           # tokens per minute (prompt + completion)
    concurrency: int | None = None   # generations queued or running at once
    max_priority: int | None = None  # highest job priority this key may ask for; None = the server default
    # "whsec_...": signs this key's webhooks, so one tenant cannot forge another's. None until first needed.
    webhook_secret: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=_ts())


class UsageRow(SQLModel, table=True):
    """One billable request: a finished generation or a classification."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_owner_at", "owner", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    owner: str | None = Field(default=None, max_length=64)
    kind: str = Field(max_length=16)  # generation | classification
    model_version: str = Field(max_length=64)
    at: datetime = Field(sa_column=_ts(nullable=False, index=True))
    prompt_tokens: int = 0
    completion_tokens: int = 0
