"""The first admin key: handed over once, never in a log, never minted again."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from app.jobs.keys import FIRST_KEY_FILE
from tests.conftest import ROOT, ServerProcess


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=server.env,
                          capture_output=True, text=True)


def test_first_key_goes_to_a_private_file_and_is_not_made_again(tmp_path, tiny_model_dir):
    server = ServerProcess(tmp_path, {"INFERQL_MODEL_PATH": str(tiny_model_dir)}).start()
    key_file = Path(server.env["INFERQL_DATA_DIR"]) / FIRST_KEY_FILE
    try:
        key = server.key  # read from the file by the harness, which also checks the log holds no key
        assert key.startswith("iq_")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
        assert str(key_file.resolve()) in server.log()  # the log says where it is
    finally:
        server.stop()
    assert cli(server, "keys", "revoke", "local").returncode == 0
    key_file.unlink()
    # Every key revoked: a restart must not mint a new admin key.
    same_data = {k: server.env[k] for k in ("INFERQL_MODEL_PATH", "INFERQL_DATABASE_URL", "INFERQL_DATA_DIR")}
    again = ServerProcess(tmp_path, same_data, key="unused").start()
    try:
        assert not key_file.exists()
        listing = cli(server, "keys", "list").stdout
        assert listing.count("\n") == 1 and "revoked" in listing, listing
    finally:
        again.stop()


async def test_replicas_starting_together_make_one_first_key(tmp_path, monkeypatch):
    """Two API replicas starting at once on a fresh database both find no key; the name is
    unique, so one makes it and the other starts without it (it used to fail to start)."""
    import asyncio

    from app.jobs.keys import KeyStore
    from app.jobs.persistence.db import Database
    from app.jobs.persistence.migrate import upgrade
    from app.settings import Settings
    from app.wiring import bootstrap_key, key_defaults

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    await upgrade(db.engine)
    keys = KeyStore(db, key_defaults(Settings(_env_file=None)))
    listed = keys.list
    both_looked = asyncio.Barrier(2)

    async def list_then_wait():  # both replicas see the empty table before either creates
        found = await listed()
        await both_looked.wait()
        return found

    monkeypatch.setattr(keys, "list", list_then_wait)
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    await asyncio.gather(bootstrap_key(keys, data_a), bootstrap_key(keys, data_b))
    files = [d / FIRST_KEY_FILE for d in (data_a, data_b) if (d / FIRST_KEY_FILE).exists()]
    assert len(files) == 1 and files[0].read_text().startswith("iq_")
    assert [k.name for k in await listed()] == ["local"]
    await db.dispose()
