"""Per-tenant rate limits, concurrency and monthly quota (Redis Lua script, in-process fallback)."""

from app.limits.limiter import Limiter, QuotaBaseline
from app.limits.types import Admission, LimitSubject, TenantLimits

__all__ = ["Admission", "LimitSubject", "Limiter", "QuotaBaseline", "TenantLimits"]
