"""The one way the job layer opens Redis.

redis-py (8.x) gives a connection a 5-second socket timeout by default, which cuts short
any blocking read that waits about as long (XREAD BLOCK, BLPOP, a pub/sub wait) with a
TimeoutError. Each client here gets a timeout longer than the longest wait it makes.
"""

from __future__ import annotations

import redis.asyncio as aredis


def redis_client(url: str, *, longest_wait: float = 0.0) -> aredis.Redis:
    """longest_wait: seconds of the longest blocking command this client sends."""
    return aredis.Redis.from_url(url, socket_timeout=longest_wait + 10.0, socket_connect_timeout=5.0)
