"""The Canceller across processes, on Redis pub/sub.

`cancel(job_id)` publishes the id on one channel; every worker process listens there and
stops the job if it runs it (within a decode step). Whoever asked then waits for the job's
terminal event on the EventBus, as in process. A message nobody runs the job for is
dropped; a worker that claimed the job a moment before still sees it (Worker.cancel keeps
early cancels a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aredis

from app.inference.types import FinishReason

log = logging.getLogger(__name__)


class RedisCanceller:
    def __init__(self, url: str, *, prefix: str = "inferql:") -> None:
        self._redis = aredis.Redis.from_url(url)
        self.channel = f"{prefix}cancel"
        self._listener: asyncio.Task | None = None

    async def cancel(self, job_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """True when at least one worker process got the message (not that one runs the job)."""
        return await self._redis.publish(self.channel, job_id) > 0

    async def listen(self, stop_here: Callable[[str], Awaitable[bool]]) -> None:
        """Starts passing every cancel message to `stop_here` (a local Worker's cancel);
        returns once subscribed, so no message published after it is missed."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel)
        self._listener = asyncio.create_task(self._listen(pubsub, stop_here), name="cancel-listener")

    async def _listen(self, pubsub, stop_here: Callable[[str], Awaitable[bool]]) -> None:
        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None:
                        await stop_here(message["data"].decode())
                except (ConnectionError, aredis.ConnectionError):
                    log.warning("cancel channel lost; resubscribing", exc_info=True)
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(Exception):
                        await pubsub.subscribe(self.channel)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()
