"""The in-process limiter: the same rules as the Lua script, for one process, when Redis is absent or down.

Buckets refill continuously (token buckets of one minute's capacity), so a tenant may burst its whole
per-minute limit and then gets one more request every 60/RPM seconds. Concurrency is a set of leases that
expire after `lease_ttl` (a crashed request cannot hold its slot forever). Every method is synchronous
and holds a lock, so an admission is atomic for any mix of threads and event loops.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from app.limits.types import (
    REASON_CONCURRENCY,
    REASON_QUOTA,
    REASON_REQUESTS,
    REASON_TOKENS,
    REASON_TOO_LARGE,
    Decision,
    TenantLimits,
)

# Asked of the caller when a quota applies and this month's usage is not known yet.
NEED_BASELINE = "need_baseline"
CONCURRENCY_RETRY_S = 1.0


def refill(level: float | None, since: float, capacity: int, now: float) -> float:
    if level is None:
        return float(capacity)
    return min(float(capacity), level + max(0.0, now - since) * capacity / 60.0)


def reset_after(level: float, capacity: int) -> float:
    """Seconds until a bucket is full again."""
    return 0.0 if capacity <= 0 else max(0.0, (capacity - level) * 60.0 / capacity)


@dataclass(slots=True)
class _TenantState:
    requests: float | None = None
    requests_at: float = 0.0
    tokens: float | None = None
    tokens_at: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expiry (epoch s)


class MemoryBackend:
    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}
        self._months: dict[tuple[str, str], int] = {}  # (tenant, YYYYMM) -> tokens counted

    def admit(
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
        with self._lock:
            state = self._tenants.setdefault(limits.tenant_id, _TenantState())
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            conc, quota = limits.max_concurrent_requests, limits.monthly_token_quota
            req = refill(state.requests, state.requests_at, rpm, now) if rpm is not None else None
            tok = refill(state.tokens, state.tokens_at, tpm, now) if tpm is not None else None
            state.leases = {k: exp for k, exp in state.leases.items() if exp > now}
            used = 0
            month_key = (limits.tenant_id, month)
            if quota is not None:
                if month_key not in self._months:
                    if baseline is None:
                        return NEED_BASELINE
                    # A new month: the tenant's older counters are of no further use.
                    for key in [k for k in self._months if k[0] == limits.tenant_id]:
                        del self._months[key]
                    self._months[month_key] = baseline
                used = self._months[month_key]

            reason: str | None = None
            wait = 0.0
            never = False
            if req is not None and rpm is not None and req < 1:
                reason = REASON_REQUESTS
                never = never or rpm == 0
                wait = max(wait, (1 - req) * 60.0 / rpm) if rpm else wait
            if tok is not None and tpm is not None:
                if reserve > tpm:
                    reason, never = reason or REASON_TOO_LARGE, True
                elif tok < reserve:
                    reason = reason or REASON_TOKENS
                    wait = max(wait, (reserve - tok) * 60.0 / tpm)
            if conc is not None and len(state.leases) >= conc:
                reason = reason or REASON_CONCURRENCY
                never = never or conc == 0
                wait = max(wait, CONCURRENCY_RETRY_S)
            if quota is not None:
                if reserve > quota:
                    reason, never = reason or REASON_TOO_LARGE, True
                elif used + reserve > quota:
                    reason = reason or REASON_QUOTA
                    wait = max(wait, month_end - now)

            if reason is None:
                if req is not None:
                    req -= 1
                    state.requests, state.requests_at = req, now
                if tok is not None:
                    tok -= reserve
                    state.tokens, state.tokens_at = tok, now
                state.leases[lease_id] = now + lease_ttl
                if quota is not None:
                    self._months[month_key] = used + reserve
            return Decision(
                allowed=reason is None,
                reason=reason,
                retry_after=None if reason is None or never else wait,
                remaining_requests=req,
                reset_requests=reset_after(req, rpm) if req is not None and rpm is not None else None,
                remaining_tokens=tok,
                reset_tokens=reset_after(tok, tpm) if tok is not None and tpm is not None else None,
            )

    def settle(self, limits: TenantLimits, lease_id: str, delta: int, now: float, month: str) -> bool:
        """Release the lease and give back `delta` unused tokens (negative: charge the overrun).
        Returns False, changing nothing, when this lease was already settled or has expired."""
        with self._lock:
            state = self._tenants.get(limits.tenant_id)
            if state is None or state.leases.pop(lease_id, None) is None:
                return False
            tpm = limits.tokens_per_minute
            if tpm is not None and delta:
                level = refill(state.tokens, state.tokens_at, tpm, now)
                state.tokens, state.tokens_at = min(float(tpm), level + delta), now
            month_key = (limits.tenant_id, month)
            if month_key in self._months and delta:
                self._months[month_key] -= delta
            return True

    def forget_month(self, tenant_id: str, month: str) -> None:
        """Drop a tenant's count for a month, so the next admission asks for the baseline again."""
        with self._lock:
            self._months.pop((tenant_id, month), None)

    def running(self, tenant_id: str, now: float) -> int:
        with self._lock:
            state = self._tenants.get(tenant_id)
            return 0 if state is None else sum(1 for exp in state.leases.values() if exp > now)
