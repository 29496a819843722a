"""Signals between processes on Redis pub/sub: cancel messages and webhook wake-ups.

A `RedisChannel` publishes short messages that every process listening on it gets, while
it listens (pub/sub keeps nothing: what matters is also stored elsewhere, and each
listener has its own fallback).

- `RedisCanceller` is the Canceller across processes: `cancel(job_id)` publishes the id;
  every worker process listens and stops the job if it runs it (within a decode step).
  Whoever asked then waits for the job's terminal event on the EventBus, as in process. A
  worker that claimed the job a moment before still sees it (Worker.cancel keeps early
  cancels a while).
- Webhook wake-ups: a worker stores a job's end with its webhook message in the database;
  the API replicas deliver webhooks, and this wakes their dispatchers at once (otherwise
  they would find the message on their next pass, up to a minute later).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aredis

from app.inference.types import FinishReason

from .redis_client import redis_client

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[object] | object]


class RedisChannel:
    def __init__(self, url: str, name: str) -> None:
        self._redis = redis_client(url, longest_wait=5.0)
        self.name = name
        self._listener: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()

    async def publish(self, message: str) -> int:
        """Returns how many processes listened."""
        return await self._redis.publish(self.name, message)

    def notify(self, message: str = "") -> None:
        """publish() without waiting (from synchronous code in the event loop)."""
        task = asyncio.get_running_loop().create_task(self.publish(message))
        self._sends.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not publish on %s: %s", self.name, task.exception())

    async def listen(self, handler: Handler) -> None:
        """Passes every message to `handler` from now on; returns once subscribed, so no
        message published after it returns is missed."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.name)
        self._listener = asyncio.create_task(self._listen(pubsub, handler), name=f"listen-{self.name}")

    async def _listen(self, pubsub, handler: Handler) -> None:
        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    result = handler(message["data"].decode())
                    if inspect.isawaitable(result):
                        await result
                except aredis.RedisError:
                    log.warning("Redis channel %s lost; subscribing again", self.name, exc_info=True)
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(aredis.RedisError):
                        await pubsub.subscribe(self.name)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await asyncio.gather(*self._sends, return_exceptions=True)
        await self._redis.aclose()


class RedisCanceller:
    def __init__(self, url: str, *, prefix: str = "inferql:") -> None:
        self.channel = RedisChannel(url, f"{prefix}cancel")

    async def cancel(self, job_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """True when at least one worker process got the message (not that one runs the job)."""
        return await self.channel.publish(job_id) > 0

    async def listen(self, stop_here: Callable[[str], Awaitable[bool]]) -> None:
        """Passes every cancel to `stop_here` (the local Worker's cancel)."""
        await self.channel.listen(stop_here)

    async def aclose(self) -> None:
        await self.channel.aclose()
