"""The database and its folder are private to the server's user."""

from __future__ import annotations

import stat

from app.jobs.persistence.db import Database
from app.jobs.persistence.migrate import upgrade


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_sqlite_database_is_private(tmp_path):
    folder = tmp_path / "fresh" / "data"
    db = Database(f"sqlite:///{folder / 'inferql.db'}")
    try:
        await upgrade(db.engine)  # writes: the -wal file exists now
        assert mode(folder) == 0o700
        assert mode(folder / "inferql.db") == 0o600
        wal = folder / "inferql.db-wal"
        assert not wal.exists() or mode(wal) == 0o600
    finally:
        await db.dispose()


async def test_an_existing_database_of_ours_is_tightened(tmp_path):
    path = tmp_path / "old.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    db = Database(f"sqlite:///{path}")
    await db.dispose()
    assert mode(path) == 0o600
