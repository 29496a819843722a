"""Webhook signing secrets: the server-wide one (for jobs made with auth off), kept in a
private file in the data folder; each API key has its own in the database (keys.py)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from pydantic import SecretStr

from .keys import new_webhook_secret
from .persistence.db import private_dir

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"


def load_or_create_secret(data_dir: Path) -> str:
    """The server-wide signing secret kept in data_dir, created on first use. The file is
    readable by its owner only (0600), and is written whole or not at all."""
    path = data_dir / SECRET_FILE
    if path.is_file():
        secret = path.read_text().strip()
        if secret:
            if path.stat().st_mode & 0o077:
                try:
                    path.chmod(0o600)
                except OSError:
                    log.warning("%s is readable by other users; make it 0600", path)
            return secret
    private_dir(data_dir)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{SECRET_FILE}-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_webhook_secret() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first: keep its secret
        except FileExistsError:
            if not path.read_text().strip():  # an empty file left by an older version
                os.replace(tmp, path)
                tmp = None
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            os.unlink(tmp)
    return path.read_text().strip()


def secret_value(secret: str | SecretStr) -> str:
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret
