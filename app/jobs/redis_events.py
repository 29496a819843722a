"""The EventBus on Redis Streams: one stream per job, shared by every replica.

A job's stream is `<prefix>events:<job id>`; an entry's id is `<seq>-0`, so the seq a
subscriber knows is also where it resumes (`XREAD ... <after>-0`). One Lua script numbers
and adds an event atomically (it reads the stream's last id, refuses an event after the
terminal one), and sets the stream's TTL: `ended_ttl` once the terminal event is in (then
the job is replayed from the database), `live_ttl` before that, so a stream whose worker
died does not stay forever.

Appends made in the same turn of the event loop (one engine step's tokens for every running
job) go to Redis in one pipeline: one round trip per step, not one per token.

`follow` first asks whether the stream exists (one EXISTS): None sends the caller to the
database.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import datetime
from typing import Any

from redis.exceptions import ResponseError

from app.inference.types import ModelInfo

from .redis_client import redis_client
from .domain import GenerationResult, JobError, JobStatus, TokenRecord
from .events import (
    TERMINAL,
    EventBus,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    JobEvent,
    JobQueued,
    TokenGenerated,
    numbered,
)

__all__ = ["RedisEventBus", "event_from_json", "event_to_json"]


# ---- events <-> JSON ---------------------------------------------------------------------
# The seq is not in the JSON: it is the stream entry's id.

def _body(event: JobEvent) -> dict[str, Any]:
    match event:
        case JobQueued():
            return {"position": event.position}
        case GenerationStarted():
            return {"model": asdict(event.model), "prompt_tokens": event.prompt_tokens}
        case TokenGenerated():
            return {"token": event.token.to_dict()}
        case GenerationCompleted():
            return {"result": event.result.to_dict()}
        case GenerationFailed():
            return {"error": asdict(event.error)}
        case GenerationCancelled():
            return {"result": event.result.to_dict(), "status": event.status.value}
    raise TypeError(f"not a job event: {event!r}")


def event_to_json(event: JobEvent) -> str:
    return json.dumps({"type": type(event).__name__, "job_id": event.job_id, "at": event.at.isoformat(),
                       **_body(event)}, separators=(",", ":"))


def event_from_json(data: str | bytes, seq: int) -> JobEvent:
    d = json.loads(data)
    job_id, at = d["job_id"], datetime.fromisoformat(d["at"])
    match d["type"]:
        case "JobQueued":
            return JobQueued(job_id, at, seq=seq, position=d["position"])
        case "GenerationStarted":
            return GenerationStarted(job_id, at, seq=seq, model=ModelInfo(**d["model"]),
                                     prompt_tokens=d["prompt_tokens"])
        case "TokenGenerated":
            return TokenGenerated(job_id, at, seq=seq, token=TokenRecord.from_dict(d["token"]))
        case "GenerationCompleted":
            return GenerationCompleted(job_id, at, seq=seq, result=GenerationResult.from_dict(d["result"]))
        case "GenerationFailed":
            return GenerationFailed(job_id, at, seq=seq, error=JobError(**d["error"]))
        case "GenerationCancelled":
            return GenerationCancelled(job_id, at, seq=seq, result=GenerationResult.from_dict(d["result"]),
                                       status=JobStatus(d["status"]))
    raise ValueError(f"unknown event type {d['type']!r}")


# ---- the bus --------------------------------------------------------------------------------

# KEYS[1] the stream; ARGV: event JSON, "1" if terminal, ended TTL (ms), live TTL (ms).
# Every entry holds t (terminal flag) first, then e (the event).
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq = 1
if #last > 0 then
  if last[1][2][2] == '1' then
    return redis.error_reply('ENDED event after the terminal one')
  end
  seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1
end
redis.call('XADD', KEYS[1], seq .. '-0', 't', ARGV[2], 'e', ARGV[1])
if ARGV[2] == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return seq
"""


def _seq(entry_id: bytes | str) -> int:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


class RedisEventBus(EventBus):
    """EventBus on Redis Streams (see the module doc)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "inferql:",
                 ended_ttl: float = 3600, live_ttl: float = 86_400, block_ms: int = 5000) -> None:
        self._redis = redis_client(url, longest_wait=block_ms / 1000)
        self._prefix = prefix
        self.ended_ttl, self.live_ttl, self._block_ms = ended_ttl, live_ttl, block_ms  # TTLs in seconds
        self._ttl_ms = (max(1, int(ended_ttl * 1000)), max(1, int(live_ttl * 1000)))
        self._append = self._redis.register_script(_APPEND)
        self._pending: list[tuple[JobEvent, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task | None = None

    def key(self, job_id: str) -> str:
        return f"{self._prefix}events:{job_id}"

    async def aclose(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._redis.aclose()

    # ---- append: batched per turn of the event loop ---------------------------------------

    async def append(self, event: JobEvent) -> JobEvent:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return numbered(event, await future)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other appends of this turn join
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for event, _ in batch:
                        await self._append(keys=[self.key(event.job_id)],
                                           args=[event_to_json(event), int(isinstance(event, TERMINAL)),
                                                 *self._ttl_ms], client=pipe)
                    results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the connection failed: every append of the batch did
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (event, future), result in zip(batch, results):
                if future.done():  # its appender was cancelled
                    continue
                if isinstance(result, ResponseError) and "ENDED" in str(result):
                    future.set_exception(RuntimeError(f"job {event.job_id}: event after the terminal one"))
                elif isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(int(result))

    # ---- reading -----------------------------------------------------------------------------

    async def _last(self, job_id: str) -> tuple[int, bool] | None:
        last = await self._redis.xrevrange(self.key(job_id), count=1)
        if not last:
            return None
        entry_id, fields = last[0]
        return _seq(entry_id), fields[b"t"] == b"1"

    async def last_seq(self, job_id: str) -> int | None:
        last = await self._last(job_id)
        return last[0] if last is not None else None

    async def ended(self, job_id: str) -> bool | None:
        last = await self._last(job_id)
        return last[1] if last is not None else None

    async def follow_batches(self, job_id: str, after: int = 0) -> AsyncIterator[list[JobEvent]] | None:
        if not await self._redis.exists(self.key(job_id)):
            return None
        return self._follow(job_id, after)

    async def _follow(self, job_id: str, after: int) -> AsyncIterator[list[JobEvent]]:
        key, sent = self.key(job_id), after
        block: int | None = None  # the first read does not wait: a finished stream ends at once
        while True:
            reply = await self._redis.xread({key: f"{sent}-0"}, count=512, block=block)
            entries = reply[0][1] if reply else []
            batch: list[JobEvent] = []
            for entry_id, fields in entries:
                sent = _seq(entry_id)
                batch.append(event_from_json(fields[b"e"], sent))
                if fields[b"t"] == b"1":
                    yield batch
                    return
            if batch:
                yield batch
                continue
            last = await self._last(job_id)
            if last is None or last[1]:  # expired meanwhile, or `after` was at or past the end
                return
            block = self._block_ms
