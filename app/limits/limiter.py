"""`Limiter`: admit and settle requests against a tenant's limits, in Redis when it answers, else in-process.

The completion path calls `admit` before anything is reserved and `settle` exactly once when the request
ends (finished, aborted, failed). Redis failing never fails a request: the in-process backend takes over
at once and Redis is tried again `redis_retry_s` later. A settle that cannot reach Redis is kept and
replayed when Redis answers again (the settle script is idempotent per lease, so replays are harmless).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.limits.memory import NEED_BASELINE, MemoryBackend
from app.limits.redis_backend import RedisBackend
from app.limits.types import Admission, Decision, LimitSubject, TenantLimits, month_window, rate_limit_headers

log = logging.getLogger(__name__)

# Tokens already counted this month for a tenant (from the usage rows), asked once per month key.
QuotaBaseline = Callable[[str, str], Awaitable[int]]

MAX_PENDING_SETTLES = 100_000
# What a dead, restarting or unreachable Redis raises. Anything else (a quota baseline the database
# could not give, say) is not Redis's fault and propagates to the caller.
REDIS_DOWN = (RedisError, OSError, TimeoutError)
TIMEOUTS = (RedisTimeoutError, TimeoutError)
# Replays per call, so the first request after an outage does not pay for all of them.
FLUSH_BATCH = 64
REDIS_CONNECTIONS = 16


class Limiter:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        key_prefix: str = "lpx",
        lease_ttl_s: float = 900.0,
        redis_retry_s: float = 2.0,
        redis_timeout_s: float = 0.5,
        quota_baseline: QuotaBaseline | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._memory = MemoryBackend()
        self._redis: RedisBackend | None = None
        self._client: Any = None
        if redis_url:
            self._client = _redis_client(redis_url, redis_timeout_s)
            self._redis = RedisBackend(self._client, key_prefix)
        self._lease_ttl = lease_ttl_s
        self._retry_s = redis_retry_s
        self._redis_down_until = 0.0  # monotonic
        self._pending: deque[tuple[Admission, int]] = deque()
        # Quota releases of swept reservations that Redis missed: (tenant, month, tokens), replayed first.
        self._pending_releases: deque[tuple[str, str, int]] = deque()
        self._quota_baseline = quota_baseline
        self._clock = clock

    @property
    def backend(self) -> str:
        """Which backend the next admission will try first."""
        return "redis" if self._redis is not None and time.monotonic() >= self._redis_down_until else "memory"

    async def admit(self, tenant: LimitSubject | TenantLimits, reserve_tokens: int) -> Admission:
        """Check and take one request, `reserve_tokens` (prompt + max_tokens) and a concurrency slot."""
        limits = tenant if isinstance(tenant, TenantLimits) else TenantLimits.of(tenant)
        reserve = max(0, int(reserve_tokens))
        now = self._clock()
        month, month_end = month_window(now)
        admission = Admission(
            limits=limits, reserved_tokens=reserve, allowed=False, backend="memory", month=month
        )
        decision: Decision | None = None
        if self.backend == "redis":
            decision = await self._admit_redis(admission, now, month_end)
        if decision is None:
            admission.backend = "memory"
            decision = await self._with_baseline(
                lambda baseline: self._memory.admit(
                    limits, reserve, admission.id, self._lease_ttl, now, month, month_end, baseline
                ),
                limits,
                month,
            )
        admission.allowed = decision.allowed
        admission.reason = decision.reason
        admission.retry_after = decision.retry_after
        admission.headers = rate_limit_headers(limits, decision)
        admission.settled = not decision.allowed  # a refusal holds nothing to give back
        return admission

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        """Give back the unused part of the reservation and release the concurrency slot. Safe to call
        more than once: only the first call of an admitted request changes anything."""
        if admission.settled:
            return
        admission.settled = True
        delta = admission.reserved_tokens - max(0, int(used_tokens))
        if admission.backend == "memory":
            self._memory.settle(admission.limits, admission.id, delta, self._clock(), admission.month)
            return
        await self._settle_redis(admission, delta)

    async def release_quota(self, tenant_id: str, month: str, tokens: int) -> bool:
        """Stop counting `tokens` against a tenant's month (YYYYMM): the reservation of a request whose
        process died (the sweeper expired its row). The in-process count of that month is dropped and
        re-read from the usage rows on the next admission (it may or may not hold this reservation,
        depending on when it was read); Redis gets the release now, or when it answers again. True when
        Redis took it now."""
        self._memory.forget_month(tenant_id, month)
        if self._redis is None:
            return False
        release = (tenant_id, month, max(0, int(tokens)))
        if self.backend == "redis":
            try:
                await self._flush_pending()
                await self._redis.release_quota(*release)
                return True
            except REDIS_DOWN as exc:
                self._mark_down(exc)
        if len(self._pending_releases) < MAX_PENDING_SETTLES:
            self._pending_releases.append(release)
        return False

    async def running(self, tenant_id: str) -> int:
        """Concurrency slots a tenant holds now (in the backend that answers)."""
        now = self._clock()
        if self.backend == "redis":
            assert self._redis is not None
            try:
                return await self._redis.running(tenant_id, now)
            except REDIS_DOWN as exc:
                self._mark_down(exc)
        return self._memory.running(tenant_id, now)

    async def ping(self) -> bool:
        """True when Redis answers (False when it is down or not configured); never raises."""
        if self._client is None:
            return False
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _admit_redis(self, admission: Admission, now: float, month_end: float) -> Decision | None:
        assert self._redis is not None
        redis = self._redis
        try:
            await self._flush_pending()
            decision = await self._with_baseline(
                lambda baseline: redis.admit(
                    admission.limits,
                    admission.reserved_tokens,
                    admission.id,
                    self._lease_ttl,
                    now,
                    admission.month,
                    month_end,
                    baseline,
                ),
                admission.limits,
                admission.month,
            )
        except REDIS_DOWN as exc:
            self._mark_down(exc)
            if isinstance(exc, TIMEOUTS) and len(self._pending) < MAX_PENDING_SETTLES:
                # The script may have run before the reply was lost: undo it once Redis answers
                # (a no-op if it never ran), or its slot and tokens stay taken until the lease ends.
                self._pending.append((admission, admission.reserved_tokens))
            return None
        admission.backend = "redis"
        return decision

    async def _with_baseline(
        self, call: Callable[[int | None], Any], limits: TenantLimits, month: str
    ) -> Decision:
        result = call(None)
        if isinstance(result, Awaitable):
            result = await result
        if result != NEED_BASELINE:
            return result  # type: ignore[no-any-return]
        baseline = 0
        if self._quota_baseline is not None:
            baseline = max(0, int(await self._quota_baseline(limits.tenant_id, month)))
        result = call(baseline)
        if isinstance(result, Awaitable):
            result = await result
        assert isinstance(result, Decision)
        return result

    async def _settle_redis(self, admission: Admission, delta: int) -> None:
        assert self._redis is not None
        try:
            await self._flush_pending()
            await self._redis.settle(admission.limits, admission.id, delta, self._clock(), admission.month)
        except REDIS_DOWN as exc:
            self._mark_down(exc)
            if len(self._pending) < MAX_PENDING_SETTLES:
                self._pending.append((admission, delta))

    async def _flush_pending(self) -> None:
        # Each item leaves its queue before it is sent (and goes back if sending fails): concurrent
        # requests flush at once, and none may send an item twice or pop from an empty queue.
        assert self._redis is not None
        for _ in range(FLUSH_BATCH):
            if not self._pending_releases:
                break
            release = self._pending_releases.popleft()
            try:
                await self._redis.release_quota(*release)
            except BaseException:
                self._pending_releases.appendleft(release)
                raise
        for _ in range(FLUSH_BATCH):
            if not self._pending:
                break
            admission, delta = self._pending.popleft()
            try:
                await self._redis.settle(
                    admission.limits, admission.id, delta, self._clock(), admission.month
                )
            except BaseException:
                self._pending.appendleft((admission, delta))
                raise

    def _mark_down(self, exc: BaseException) -> None:
        if time.monotonic() >= self._redis_down_until:
            log.warning("redis limiter unavailable (%s); using the in-process limiter", exc)
        self._redis_down_until = time.monotonic() + self._retry_s


def _redis_client(url: str, timeout_s: float) -> Any:
    import redis.asyncio as redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Fail fast: a request must not wait on a dead Redis, it falls back to the in-process limiter. A burst
    # of requests shares a bounded set of connections instead of opening one each at once (fifty
    # simultaneous connects on a busy loop miss the connect timeout, and the limiter would fall back
    # while Redis is fine); the wait for a free connection is bounded too.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=max(timeout_s * 4, 1.0),
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return redis.Redis.from_pool(pool)
