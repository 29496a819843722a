"""Throwaway PostgreSQL databases and the Redis URL for the tests and the bench.

The server is INFERQL_TEST_POSTGRES_URL's (default: the local test database); each user
makes its own database on it and drops it afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg

POSTGRES = os.environ.get("INFERQL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("INFERQL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.asynccontextmanager
async def fresh_postgres(prefix: str = "inferql_test") -> AsyncIterator[str]:
    """A new, empty database's URL; dropped (connections and all) on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(POSTGRES)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
