"""Database tables (SQLModel). Only the store touches these."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Text
from sqlmodel import Field, SQLModel


def _ts(nullable: bool = True) -> Column:
    return Column(DateTime(timezone=True), nullable=nullable)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=36)
    owner: str | None = Field(default=None, index=True, max_length=64)  # the API key that submitted it
    status: str = Field(index=True, max_length=16)
    priority: int = 0
    input_json: str = Field(sa_column=Column(Text, nullable=False))
    idempotency_key: str | None = Field(default=None, index=True, max_length=200)
    webhook_url: str | None = Field(default=None, max_length=2048)
    deadline_at: datetime | None = Field(default=None, sa_column=_ts())
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts())
    attempts: int = 0
    result_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
