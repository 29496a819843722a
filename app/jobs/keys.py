"""API keys: created and revoked by the CLI, looked up by the API on every request."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from .persistence.db import Database
from .domain import Caller
from .persistence.tables import ApiKeyRow

KEY_PREFIX = "iq_"
FIRST_KEY_FILE = "first-admin-key.txt"  # in the data dir: the first admin key, when no terminal shows it


class KeyNameTaken(ValueError):
    pass


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    admin: bool
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    created_at: datetime
    revoked_at: datetime | None
    max_priority: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: "whsec_" + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def ensure_webhook_secret(session: Session, key_id: str) -> str | None:
    """The webhook secret of a key, created (once, whoever asks first) if it has none yet.
    None for an unknown key. The caller commits."""
    session.exec(update(ApiKeyRow).where(col(ApiKeyRow.id) == key_id, col(ApiKeyRow.webhook_secret).is_(None))
                 .values(webhook_secret=new_webhook_secret()))
    return session.exec(select(ApiKeyRow.webhook_secret).where(col(ApiKeyRow.id) == key_id)).first()


@dataclass(frozen=True)
class Defaults:
    """Limits for keys created without their own."""

    rpm: int
    tpm: int
    concurrency: int
    max_priority: int = 50  # admin keys may use the whole range (100)


class KeyStore:
    def __init__(self, db: Database, defaults: Defaults, cache_seconds: float = 0.0) -> None:
        self._db = db
        self.defaults = defaults
        # Every request authenticates; a short cache saves the database round trip at the
        # price of a revocation taking effect up to cache_seconds later.
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Caller | None]] = {}

    async def create(self, name: str, *, admin: bool = False, rpm: int | None = None, tpm: int | None = None,
                     concurrency: int | None = None, max_priority: int | None = None) -> str:
        """Returns the new key; only its hash is stored, so this is the one chance to see it."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(id=str(uuid.uuid4()), name=name, key_hash=hash_key(key), prefix=key[:10], admin=admin,
                        rpm=rpm, tpm=tpm, concurrency=concurrency, max_priority=max_priority,
                        webhook_secret=new_webhook_secret(),
                        created_at=datetime.now(UTC))
        try:
            await self._db.transaction(lambda session: session.add(row))
        except IntegrityError:
            raise KeyNameTaken(f"a key named {name!r} already exists") from None
        return key

    async def revoke(self, name: str) -> bool:
        def revoke(session: Session) -> bool:
            row = session.exec(select(ApiKeyRow).where(col(ApiKeyRow.name) == name)).first()
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = datetime.now(UTC)
            return True

        return await self._db.transaction(revoke)

    async def webhook_secret(self, name: str) -> str | None:
        """The secret that signs this key's webhooks (created now for a key made before keys had
        one); None when no key has this name."""

        def secret(session: Session) -> str | None:
            key_id = session.exec(select(ApiKeyRow.id).where(col(ApiKeyRow.name) == name)).first()
            return ensure_webhook_secret(session, key_id) if key_id is not None else None

        return await self._db.transaction(secret)

    async def list(self) -> list[KeyInfo]:
        query = select(ApiKeyRow).order_by(col(ApiKeyRow.created_at))
        return await self._db.read(lambda session: [
            KeyInfo(r.id, r.name, r.prefix, r.admin, r.rpm, r.tpm, r.concurrency, r.created_at, r.revoked_at,
                    r.max_priority)
            for r in session.exec(query)
        ])

    async def authenticate(self, key: str) -> Caller | None:
        """The caller a key belongs to; None for an unknown or revoked key."""
        if not key.startswith(KEY_PREFIX) or len(key) > 100:
            return None
        if self._cache_seconds <= 0:
            return await self._lookup(key)
        digest, now = hash_key(key), time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        caller = await self._lookup(key)
        if len(self._cache) > 10_000:  # unknown keys from a scanner must not grow it forever
            self._cache.clear()
        self._cache[digest] = (now + self._cache_seconds, caller)
        return caller

    async def _lookup(self, key: str) -> Caller | None:
        query = select(ApiKeyRow).where(col(ApiKeyRow.key_hash) == hash_key(key))
        row = await self._db.read(lambda session: session.exec(query).first())
        # compare_digest: the lookup already matched, this only keeps timing flat for near-misses
        if row is None or row.revoked_at is not None or not secrets.compare_digest(row.key_hash, hash_key(key)):
            return None
        d = self.defaults
        return Caller(
            key_id=row.id, name=row.name, admin=row.admin,
            rpm=row.rpm if row.rpm is not None else d.rpm,
            tpm=row.tpm if row.tpm is not None else d.tpm,
            concurrency=row.concurrency if row.concurrency is not None else d.concurrency,
            max_priority=row.max_priority if row.max_priority is not None else (100 if row.admin else d.max_priority),
        )
