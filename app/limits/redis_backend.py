"""The shared limiter: every check and every update of one admission in ONE Lua script, so concurrent
API processes can never admit more than a limit allows. Same rules as `memory.py`.

Keys carry the tenant id in a hash tag, so a Redis Cluster keeps one tenant's keys on one shard:
`{prefix}:{<tenant>}:b` (hash: request and token bucket levels and their timestamps),
`{prefix}:{<tenant>}:l` (sorted set: lease id -> expiry), `{prefix}:{<tenant>}:m:<YYYYMM>` (tokens counted
against the monthly quota). The caller's clock is passed in (`now`) so both backends and the tests agree.
"""

from __future__ import annotations

from typing import Any

from app.limits.memory import NEED_BASELINE, reset_after
from app.limits.types import Decision, TenantLimits

# Numbers leave Lua as strings (Redis would truncate a Lua float reply to an integer), written and
# returned with 17 significant digits: every double survives the round trip, so the script and the
# in-process limiter (same arithmetic, same order) stay bit-for-bit alike.
NUM_LUA = """
local function num(x) return string.format('%.17g', x) end
"""

ADMIT_LUA = (
    NUM_LUA
    + """
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local conc = tonumber(ARGV[4])
local quota = tonumber(ARGV[5])
local reserve = tonumber(ARGV[6])
local lease_id = ARGV[7]
local lease_ttl = tonumber(ARGV[8])
local month_end = tonumber(ARGV[9])
local baseline = tonumber(ARGV[10])

local function refill(level, since, cap)
  if level == nil then return cap end
  local l = level + math.max(0, now - since) * cap / 60
  if l > cap then l = cap end
  return l
end

local b = redis.call('HMGET', KEYS[1], 'r', 'rt', 'k', 'kt')
local req = nil
local tok = nil
if rpm >= 0 then req = refill(tonumber(b[1]), tonumber(b[2]), rpm) end
if tpm >= 0 then tok = refill(tonumber(b[3]), tonumber(b[4]), tpm) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local used = 0
if quota >= 0 then
  local u = redis.call('GET', KEYS[3])
  if not u then
    if baseline < 0 then return {'need_baseline'} end
    redis.call('SET', KEYS[3], baseline)
    redis.call('EXPIRE', KEYS[3], math.ceil(month_end - now) + 3 * 86400)
    used = baseline
  else
    used = tonumber(u)
  end
end

local reason = nil
local wait = 0
local never = false
if req ~= nil and req < 1 then
  reason = 'requests'
  if rpm == 0 then never = true else wait = math.max(wait, (1 - req) * 60 / rpm) end
end
if tok ~= nil then
  if reserve > tpm then
    reason = reason or 'request_too_large'
    never = true
  elseif tok < reserve then
    reason = reason or 'tokens'
    wait = math.max(wait, (reserve - tok) * 60 / tpm)
  end
end
if conc >= 0 and redis.call('ZCARD', KEYS[2]) >= conc then
  reason = reason or 'concurrency'
  if conc == 0 then never = true end
  wait = math.max(wait, 1)
end
if quota >= 0 then
  if reserve > quota then
    reason = reason or 'request_too_large'
    never = true
  elseif used + reserve > quota then
    reason = reason or 'quota'
    wait = math.max(wait, month_end - now)
  end
end

if reason == nil then
  if req ~= nil then
    req = req - 1
    redis.call('HSET', KEYS[1], 'r', num(req), 'rt', num(now))
  end
  if tok ~= nil then
    tok = tok - reserve
    redis.call('HSET', KEYS[1], 'k', num(tok), 'kt', num(now))
  end
  -- An idle minute refills every bucket, so a key idle for two has nothing left to remember.
  if req ~= nil or tok ~= nil then redis.call('EXPIRE', KEYS[1], 120) end
  redis.call('ZADD', KEYS[2], now + lease_ttl, lease_id)
  redis.call('EXPIRE', KEYS[2], math.ceil(lease_ttl) + 60)
  if quota >= 0 then redis.call('INCRBY', KEYS[3], reserve) end
end
local retry = '-1'
if reason ~= nil and not never then retry = num(wait) end
return {reason or 'ok', retry, num(req or -1), num(tok or -1)}
"""
)

SETTLE_LUA = (
    NUM_LUA
    + """
local now = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local delta = tonumber(ARGV[4])
if redis.call('ZREM', KEYS[2], ARGV[3]) == 0 then return 0 end
if tpm >= 0 and delta ~= 0 then
  local b = redis.call('HMGET', KEYS[1], 'k', 'kt')
  local level = tpm
  if b[1] then level = math.min(tpm, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * tpm / 60) end
  level = math.min(tpm, level + delta)
  redis.call('HSET', KEYS[1], 'k', num(level), 'kt', num(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
if delta ~= 0 and redis.call('EXISTS', KEYS[3]) == 1 then redis.call('DECRBY', KEYS[3], delta) end
return 1
"""
)


RELEASE_QUOTA_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECRBY', KEYS[1], ARGV[1]) end
return false
"""


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


class RedisBackend:
    name = "redis"

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._release_quota = client.register_script(RELEASE_QUOTA_LUA)

    def keys(self, tenant_id: str, month: str) -> list[str]:
        base = f"{self._prefix}:{{{tenant_id}}}"
        return [f"{base}:b", f"{base}:l", f"{base}:m:{month}"]

    async def admit(
        self,
        limits: TenantLimits,
        reserve: int,
        lease_id: str,
        lease_ttl: float,
        now: float,
        month: str,
        month_end: float,
        baseline: int | None = None,
    ) -> Decision | str:
        args = [
            repr(now),
            _arg(limits.requests_per_minute),
            _arg(limits.tokens_per_minute),
            _arg(limits.max_concurrent_requests),
            _arg(limits.monthly_token_quota),
            reserve,
            lease_id,
            repr(lease_ttl),
            repr(month_end),
            -1 if baseline is None else baseline,
        ]
        reply = await self._admit(keys=self.keys(limits.tenant_id, month), args=args)
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
        if values[0] == NEED_BASELINE:
            return NEED_BASELINE
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        req = float(values[2]) if rpm is not None else None
        tok = float(values[3]) if tpm is not None else None
        retry = float(values[1])
        return Decision(
            allowed=values[0] == "ok",
            reason=None if values[0] == "ok" else values[0],
            retry_after=None if values[0] == "ok" or retry < 0 else retry,
            remaining_requests=req,
            reset_requests=reset_after(req, rpm) if req is not None and rpm is not None else None,
            remaining_tokens=tok,
            reset_tokens=reset_after(tok, tpm) if tok is not None and tpm is not None else None,
        )

    async def settle(self, limits: TenantLimits, lease_id: str, delta: int, now: float, month: str) -> bool:
        args = [repr(now), _arg(limits.tokens_per_minute), lease_id, delta]
        return bool(await self._settle(keys=self.keys(limits.tenant_id, month), args=args))

    async def release_quota(self, tenant_id: str, month: str, tokens: int) -> None:
        await self._release_quota(keys=[self.keys(tenant_id, month)[2]], args=[tokens])

    async def running(self, tenant_id: str, now: float) -> int:
        lease_key = self.keys(tenant_id, "")[1]
        return int(await self._client.zcount(lease_key, f"({now!r}", "+inf"))
