"""The QuotaStore on Redis: the same exact moving windows as MemoryQuotaStore, shared by
every replica.

A window (`<prefix>win:req:<owner>`, `<prefix>win:tok:<owner>`) is a sorted set of hits
scored by their time (Redis server time, microseconds, so replicas' clocks do not matter),
each member `<n>:<cost>`, beside a hash holding the running sum (`used`) and `n`. A token
reservation is `<prefix>res:<job id>` (owner, tpm) plus the owner's sorted set of
reservations scored by when they expire and a hash of their tokens; a reservation nobody
settles (its worker died) stops counting after `reservation_ttl` seconds.

Every check-and-change is one Lua script, so it is atomic across replicas. The scripts
reach keys they derive from the owner (standalone Redis, or one cluster slot per prefix).
"""

from __future__ import annotations


from .domain import Caller
from .redis_client import redis_client
from .errors import RateLimited

__all__ = ["RedisQuotaStore"]

# ARGV[1] is always the key prefix. Times are integer microseconds (exact in a Lua double).
_LIB = """
local P = ARGV[1]
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- a window: zset P..'win:'..name of '<n>:<cost>' by time, hash P..'wsum:'..name {used, n}
local function used(name, now, win)
  local z, m = P .. 'win:' .. name, P .. 'wsum:' .. name
  local cutoff = now - win
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old > 0 then
    local gone = 0
    for _, member in ipairs(old) do gone = gone + tonumber(string.match(member, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    redis.call('HINCRBY', m, 'used', -gone)
  end
  if redis.call('ZCARD', z) == 0 then  -- an idle key costs nothing
    redis.call('DEL', m)
    return 0
  end
  return tonumber(redis.call('HGET', m, 'used') or '0')
end
local function add(name, now, win, cost)
  local z, m = P .. 'win:' .. name, P .. 'wsum:' .. name
  used(name, now, win)
  local n = redis.call('HINCRBY', m, 'n', 1)
  redis.call('ZADD', z, now, n .. ':' .. cost)
  redis.call('HINCRBY', m, 'used', cost)
  local ms = math.ceil(win / 1000) + 1000
  redis.call('PEXPIRE', z, ms)
  redis.call('PEXPIRE', m, ms)
end
local function reset_us(name, now, win)
  local oldest = redis.call('ZRANGE', P .. 'win:' .. name, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return math.max(0, tonumber(oldest[2]) + win - now)
end
-- an owner's reservations: zset P..'rexp:'..owner of job ids by expiry, hash P..'rtok:'..owner
-- job id -> tokens, and the sum in P..'rsum:'..owner
local function drop_reservation(owner, job)
  local tok = redis.call('HGET', P .. 'rtok:' .. owner, job)
  if not tok then return 0 end
  redis.call('HDEL', P .. 'rtok:' .. owner, job)
  redis.call('ZREM', P .. 'rexp:' .. owner, job)
  redis.call('DECRBY', P .. 'rsum:' .. owner, tok)
  return tonumber(tok)
end
local function reserved(owner, now)
  local z = P .. 'rexp:' .. owner
  for _, job in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now)) do
    drop_reservation(owner, job)
    redis.call('DEL', P .. 'res:' .. job)
  end
  if redis.call('ZCARD', z) == 0 then
    redis.call('DEL', P .. 'rsum:' .. owner, P .. 'rtok:' .. owner)
    return 0
  end
  return tonumber(redis.call('GET', P .. 'rsum:' .. owner) or '0')
end
"""

# ARGV: prefix, window us, owner, limit. Returns -1 when counted, else microseconds to reset.
_HIT = _LIB + """
local now, win, name = now_us(), tonumber(ARGV[2]), 'req:' .. ARGV[3]
if used(name, now, win) + 1 > tonumber(ARGV[4]) then
  return reset_us(name, now, win)
end
add(name, now, win, 1)
return -1
"""

# ARGV: prefix, window us, owner.
_CHARGE = _LIB + """
local now = now_us()
add('req:' .. ARGV[3], now, tonumber(ARGV[2]), 1)
return 1
"""

# ARGV: prefix, window us, owner, tpm, reservation ttl us, then job id, tokens pairs.
# Returns -1 when reserved, else microseconds to reset.
_RESERVE = _LIB + """
local now, win, owner, tpm, ttl = now_us(), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local name = 'tok:' .. owner
local wanted = 0
for i = 7, #ARGV, 2 do wanted = wanted + tonumber(ARGV[i]) end
local held = reserved(owner, now)
local again = 0  -- jobs reserved again replace their old reservation
for i = 6, #ARGV, 2 do
  local tok = redis.call('HGET', P .. 'rtok:' .. owner, ARGV[i])
  if tok then again = again + tonumber(tok) end
end
if tpm - used(name, now, win) - (held - again) < wanted then
  return reset_us(name, now, win)
end
local ms = math.ceil(ttl / 1000)
for i = 6, #ARGV, 2 do
  local job, tok = ARGV[i], tonumber(ARGV[i + 1])
  drop_reservation(owner, job)
  redis.call('HSET', P .. 'rtok:' .. owner, job, tok)
  redis.call('ZADD', P .. 'rexp:' .. owner, now + ttl, job)
  redis.call('INCRBY', P .. 'rsum:' .. owner, tok)
  redis.call('HSET', P .. 'res:' .. job, 'owner', owner, 'tpm', tpm)
  redis.call('PEXPIRE', P .. 'res:' .. job, ms)
end
for _, k in ipairs({'rexp:', 'rtok:', 'rsum:'}) do redis.call('PEXPIRE', P .. k .. owner, ms) end
return -1
"""

# ARGV: prefix, window us, job id, used tokens.
_SETTLE = _LIB + """
local res = redis.call('HMGET', P .. 'res:' .. ARGV[3], 'owner', 'tpm')
if not res[1] then return 0 end
redis.call('DEL', P .. 'res:' .. ARGV[3])
local owner, tpm = res[1], tonumber(res[2])
local now = now_us()
reserved(owner, now)
if drop_reservation(owner, ARGV[3]) == 0 then return 0 end  -- it expired: nothing to settle
local usedtok = tonumber(ARGV[4])
if usedtok > 0 then add('tok:' .. owner, now, tonumber(ARGV[2]), math.min(usedtok, tpm)) end
return 1
"""

# ARGV: prefix, window us, owner. Returns {requests used, reset us, tokens used, reset us, reserved}.
_STATE = _LIB + """
local now, win, owner = now_us(), tonumber(ARGV[2]), ARGV[3]
return {used('req:' .. owner, now, win), reset_us('req:' .. owner, now, win),
        used('tok:' .. owner, now, win), reset_us('tok:' .. owner, now, win), reserved(owner, now)}
"""


def _ms(us: int) -> int:
    return -(-int(us) // 1000)  # ceil


class RedisQuotaStore:
    """QuotaStore on Redis (see the module doc); MemoryQuotaStore's semantics, across replicas."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "inferql:",
                 window_seconds: int = 60, reservation_ttl: float = 600) -> None:
        self.window_seconds = window_seconds
        self.reservation_ttl = reservation_ttl
        self._redis = redis_client(url)
        self._prefix = prefix
        self._win_us = window_seconds * 1_000_000
        self._ttl_us = int(reservation_ttl * 1_000_000)
        self._hit = self._redis.register_script(_HIT)
        self._charge = self._redis.register_script(_CHARGE)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._state = self._redis.register_script(_STATE)

    async def aclose(self) -> None:
        await self._redis.aclose()

    def _args(self, *args) -> list:
        return [self._prefix, self._win_us, *args]

    async def hit_request(self, caller: Caller) -> None:
        if caller.rpm is None or caller.owner is None:
            return
        reset = await self._hit(args=self._args(caller.owner, caller.rpm))
        if reset >= 0:
            raise RateLimited(f"rate limit: {caller.rpm} requests per minute for this key",
                              limit="requests", retryAfterMs=max(1, _ms(reset)))

    async def charge_request(self, owner: str | None) -> None:
        if owner is not None:
            await self._charge(args=self._args(owner))

    async def reserve_tokens(self, caller: Caller, job_ids: list[str], tokens_each: list[int]) -> None:
        if caller.tpm is None or caller.owner is None:
            return
        wanted = sum(tokens_each)
        if wanted > caller.tpm:
            raise RateLimited(
                f"this request needs {wanted} tokens (prompt + maxTokens) but the key allows {caller.tpm} per "
                "minute; lower maxTokens", limit="tokens", retryAfterMs=60_000,
            )
        pairs = [x for job_id, tokens in zip(job_ids, tokens_each) for x in (job_id, int(tokens))]
        reset = await self._reserve(args=self._args(caller.owner, caller.tpm, self._ttl_us, *pairs))
        if reset >= 0:
            raise RateLimited(
                f"rate limit: {caller.tpm} tokens per minute for this key (prompt + maxTokens are reserved "
                "until the job ends)", limit="tokens", retryAfterMs=max(1, _ms(reset)),
            )

    async def settle(self, job_id: str, used_tokens: int) -> None:
        await self._settle(args=self._args(job_id, int(used_tokens)))

    async def state(self, caller: Caller) -> dict | None:
        if caller.owner is None:
            return None
        req_used, req_reset, tok_used, tok_reset, held = await self._state(args=self._args(caller.owner))
        out = {}
        for name, limit, used, reset, extra in (("requests", caller.rpm, req_used, req_reset, 0),
                                                ("tokens", caller.tpm, tok_used, tok_reset, held)):
            if limit is None:
                continue
            out[name] = {"limit": limit, "remaining": max(0, limit - used - extra), "resetMs": _ms(reset)}
        if caller.concurrency is not None:
            out["concurrency"] = {"limit": caller.concurrency}
        return out
