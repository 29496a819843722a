"""Alembic migrations, applied on startup and by `inferql db upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


# pg_advisory_xact_lock key: one migrator at a time on a PostgreSQL database.
_MIGRATION_LOCK = 0x1F0E_0DB0


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Applies pending migrations in one transaction. On PostgreSQL it first takes an
    advisory lock, held to the commit: replicas starting together on a fresh database wait
    for the first one's migration, then find nothing to do (without it, all but one fail
    on alembic_version's primary key)."""

    def run(connection) -> None:
        command.upgrade(alembic_config(connection), revision)

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        await conn.run_sync(run)


async def current(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
