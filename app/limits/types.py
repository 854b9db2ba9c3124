"""What the limiter decides and what it reads from a tenant; shared by the Redis and in-process backends."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol


class LimitSubject(Protocol):
    """Anything with a tenant id and its four limits (None = unlimited); the Tenant model fits."""

    @property
    def id(self) -> object: ...
    @property
    def requests_per_minute(self) -> int | None: ...
    @property
    def tokens_per_minute(self) -> int | None: ...
    @property
    def max_concurrent_requests(self) -> int | None: ...
    @property
    def monthly_token_quota(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A snapshot of one tenant's limits taken at admission, so settle refunds against the same limits."""

    tenant_id: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    monthly_token_quota: int | None = None

    @classmethod
    def of(cls, tenant: LimitSubject) -> TenantLimits:
        def limit(value: int | None) -> int | None:
            # 0 or a negative number from a careless PATCH means "nothing allowed", not "unlimited".
            return None if value is None else max(0, int(value))

        return cls(
            tenant_id=str(tenant.id),
            requests_per_minute=limit(tenant.requests_per_minute),
            tokens_per_minute=limit(tenant.tokens_per_minute),
            max_concurrent_requests=limit(tenant.max_concurrent_requests),
            monthly_token_quota=limit(tenant.monthly_token_quota),
        )


# Why an admission was refused, in the order the checks run.
REASON_REQUESTS = "requests"
REASON_TOKENS = "tokens"
REASON_TOO_LARGE = "request_too_large"
REASON_CONCURRENCY = "concurrency"
REASON_QUOTA = "quota"

MESSAGES = {
    REASON_REQUESTS: "Rate limit reached for requests per minute.",
    REASON_TOKENS: "Rate limit reached for tokens per minute.",
    REASON_TOO_LARGE: "Request too large: prompt + max_tokens exceed the tenant's tokens per minute or monthly quota.",
    REASON_CONCURRENCY: "Too many concurrent requests for this tenant.",
    REASON_QUOTA: "Monthly token quota exhausted.",
}


@dataclass(slots=True)
class Decision:
    """A backend's answer: the state after the admission (or, when refused, without it)."""

    allowed: bool
    reason: str | None
    retry_after: float | None  # seconds; None when waiting cannot help
    remaining_requests: float | None
    reset_requests: float | None
    remaining_tokens: float | None
    reset_tokens: float | None


@dataclass(slots=True)
class Admission:
    """One admitted (or refused) request. Pass it back to `Limiter.settle` exactly once when it ends."""

    limits: TenantLimits
    reserved_tokens: int
    allowed: bool
    backend: str  # "redis" | "memory": settle goes back to whichever admitted it
    month: str  # YYYYMM the tokens were reserved against
    reason: str | None = None
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    settled: bool = False

    @property
    def message(self) -> str:
        return MESSAGES.get(self.reason or "", "Allowed.")

    @property
    def retry_after_header(self) -> dict[str, str]:
        """`Retry-After` in whole seconds (HTTP) and `retry-after-ms`, which the openai SDK prefers."""
        if self.retry_after is None:
            return {}
        return {
            "retry-after": str(max(1, math.ceil(self.retry_after))),
            "retry-after-ms": str(max(1, math.ceil(self.retry_after * 1000))),
        }


def month_window(now: float) -> tuple[str, float]:
    """The UTC calendar month holding `now`: its key (YYYYMM) and the epoch second it ends."""
    t = datetime.fromtimestamp(now, UTC)
    start_next = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return f"{t.year:04d}{t.month:02d}", start_next.timestamp()


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{rest}s"


def rate_limit_headers(limits: TenantLimits, decision: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers; a dimension without a limit sends none."""
    headers: dict[str, str] = {}
    if limits.requests_per_minute is not None and decision.remaining_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(max(0, math.floor(decision.remaining_requests)))
        headers["x-ratelimit-reset-requests"] = format_duration(decision.reset_requests or 0.0)
    if limits.tokens_per_minute is not None and decision.remaining_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(decision.remaining_tokens)))
        headers["x-ratelimit-reset-tokens"] = format_duration(decision.reset_tokens or 0.0)
    return headers
