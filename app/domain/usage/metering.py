"""Usage metering: a `reserved` row before the engine, settled exactly once when the request ends.

Exactly once is the database's job, not ours: settle is one conditional UPDATE (`WHERE request_id = ?
AND status IN ('reserved', 'expired')`), so concurrent or repeated settles of one request write it once,
whichever process sends them. When the database is down, reserving fails (the request gets a 503 and
never reaches the engine) while settling never fails the request: the settlement is kept in memory and
retried in the background until the database answers. A settle may override an `expired` row because
the sweeper can only guess that a request died; the real numbers win when they turn up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.usage.models import (
    BILLED_STATUSES,
    SETTLED_STATUSES,
    STATUS_EXPIRED,
    STATUS_RESERVED,
    UsageRecord,
)
from app.errors import ApiError

log = logging.getLogger(__name__)

# Column sizes of usage_records (models.py).
REQUEST_ID_MAX, MODEL_MAX, FINISH_REASON_MAX = 64, 200, 32

# Errors that say the statement or its data is wrong: bugs, never retried, never "unavailable".
NOT_AN_OUTAGE = (IntegrityError, ProgrammingError, DataError)
# SQLSTATE classes of an outage: connection exception, insufficient resources (too many connections),
# operator intervention (shutdown, starting up), invalid catalog name (database dropped or renamed).
OUTAGE_SQLSTATES = ("08", "53", "57", "3D", "55000")  # 55000: the database does not accept connections
SQLITE_OUTAGES = ("locked", "busy", "unable to open", "disk i/o")


def database_down(exc: BaseException) -> bool:
    """True for what a database that is down, restarting, renamed or unreachable raises. asyncpg's
    errors reach SQLAlchemy as a plain DBAPIError whatever their cause, so the cause decides."""
    if isinstance(exc, NOT_AN_OUTAGE):
        return False
    if isinstance(exc, PoolTimeoutError | OSError | TimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    seen: BaseException | None = exc.orig
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError | TimeoutError):
            return True
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and state.startswith(OUTAGE_SQLSTATES):
            return True
        if isinstance(seen, sqlite3.OperationalError) and any(w in str(seen).lower() for w in SQLITE_OUTAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def db_unavailable() -> ApiError:
    return ApiError(
        503,
        "Usage cannot be recorded right now (database unavailable); try again shortly.",
        code="database_unavailable",
        headers={"retry-after": "1"},
    )


@dataclass(frozen=True, slots=True)
class Expired:
    """A reservation the sweeper gave up on: whose, which month (YYYYMM), how many tokens it held."""

    tenant_id: str
    month: str
    reserved_tokens: int


OnExpired = Callable[[list[Expired]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    status: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None
    queue_time_s: float | None
    ttft_s: float | None
    latency_s: float | None
    settled_at: datetime


def _uuid(value: UUID | str | None) -> UUID | None:
    if value is None:
        return None
    return value if isinstance(value, UUID) else UUID(str(value))


class Metering:
    def __init__(
        self,
        session_maker: Callable[[], AsyncSession],
        *,
        timeout_s: float = 5.0,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
        single_writer: bool = False,
    ) -> None:
        self._session_maker = session_maker
        # SQLite takes one writer at a time and makes the others poll for its lock (sleeps of up to
        # 100 ms each): under load, queueing this process's usage writes here is faster and fair.
        self._writer: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if single_writer else contextlib.nullcontext()
        )
        self._timeout = timeout_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._pending: dict[str, Settlement] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Settlements waiting for the database."""
        return len(self._pending)

    async def reserve(
        self,
        request_id: str,
        tenant_id: UUID | str,
        key_id: UUID | str | None,
        adapter_id: UUID | str | None,
        adapter_version: int | None,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
    ) -> None:
        """Write the `reserved` row; ApiError 503 when the database cannot take it (nothing was written).
        `max_tokens` is the most the request may generate over all its choices."""
        if not 0 < len(request_id) <= REQUEST_ID_MAX:
            raise ValueError(f"request_id must have 1..{REQUEST_ID_MAX} characters")
        row = UsageRecord(
            request_id=request_id,
            tenant_id=_uuid(tenant_id),
            key_id=_uuid(key_id),
            adapter_id=_uuid(adapter_id),
            adapter_version=adapter_version,
            model=model[:MODEL_MAX],
            status=STATUS_RESERVED,
            reserved_tokens=max(0, prompt_tokens) + max(0, max_tokens),
            prompt_tokens=max(0, prompt_tokens),
        )
        try:
            await asyncio.wait_for(self._insert(row), self._timeout)
        except IntegrityError as exc:
            if "request_id" not in str(exc.orig):
                raise  # not a duplicate: an unknown tenant, a caller's bug
            raise ApiError(
                409, f"request id {request_id!r} was already metered", code="duplicate_request"
            ) from exc
        except Exception as exc:
            if not database_down(exc):
                raise
            log.warning("usage reservation failed for %s: %s", request_id, exc)
            raise db_unavailable() from exc

    async def settle(
        self,
        request_id: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        finish_reason: str | None,
        status: str,
        queue_time_s: float | None = None,
        ttft_s: float | None = None,
        latency_s: float | None = None,
    ) -> bool:
        """Record how the request ended. True when this call wrote the row; False when it was settled
        before, or the database is down (then it is written later, once). Never raises for the database."""
        if status not in SETTLED_STATUSES:
            raise ValueError(f"status must be one of {SETTLED_STATUSES}, got {status!r}")
        settlement = Settlement(
            request_id=request_id,
            status=status,
            prompt_tokens=max(0, prompt_tokens),
            cached_tokens=min(max(0, cached_tokens), max(0, prompt_tokens)),
            completion_tokens=max(0, completion_tokens),
            finish_reason=finish_reason[:FINISH_REASON_MAX] if finish_reason else None,
            queue_time_s=queue_time_s,
            ttft_s=ttft_s,
            latency_s=latency_s,
            settled_at=datetime.now(UTC),
        )
        try:
            return await asyncio.wait_for(self._write(settlement), self._timeout)
        except Exception as exc:
            if not database_down(exc):
                raise
            log.warning("usage settle of %s deferred, database unavailable: %s", request_id, exc)
            self._pending.setdefault(request_id, settlement)
            self._wake.set()
            return False

    async def month_tokens(self, tenant_id: str, month: str) -> int:
        """Tokens counted against the monthly quota in month YYYYMM: billed rows' prompt + completion,
        in-flight rows' whole reservation. The limiter's quota baseline."""
        start = datetime(int(month[:4]), int(month[4:]), 1, tzinfo=UTC)
        end = (start + timedelta(days=32)).replace(day=1)
        counted = case(
            (UsageRecord.status == STATUS_RESERVED, UsageRecord.reserved_tokens),
            (
                UsageRecord.status.in_(BILLED_STATUSES),
                UsageRecord.prompt_tokens + UsageRecord.completion_tokens,
            ),
            else_=0,
        )
        query = select(func.coalesce(func.sum(counted), 0)).where(
            UsageRecord.tenant_id == _uuid(tenant_id),
            UsageRecord.created_at >= start,
            UsageRecord.created_at < end,
        )
        try:
            async with self._session_maker() as session:
                return int((await session.execute(query)).scalar_one())
        except Exception as exc:
            if not database_down(exc):
                raise
            raise db_unavailable() from exc

    async def sweep(
        self, older_than_s: float, now: datetime | None = None, on_expired: OnExpired | None = None
    ) -> int:
        """Mark reservations older than `older_than_s` as `expired` (their process died): nothing is billed
        for them (the client got no answer). `on_expired` hears of each (to give back what the limiter
        still counts for them). Returns how many were swept."""
        cutoff = (now or datetime.now(UTC)) - timedelta(seconds=older_than_s)
        query = (
            update(UsageRecord)
            .where(UsageRecord.status == STATUS_RESERVED, UsageRecord.created_at < cutoff)
            .values(
                status=STATUS_EXPIRED,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                settled_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
            )
            .returning(UsageRecord.tenant_id, UsageRecord.created_at, UsageRecord.reserved_tokens)
            .execution_options(synchronize_session=False)
        )
        async with self._writer, self._session_maker() as session:
            rows = (await session.execute(query)).all()
            await session.commit()
        expired = [
            Expired(str(t), created.astimezone(UTC).strftime("%Y%m"), int(r)) for t, created, r in rows
        ]
        if expired:
            log.warning("usage sweeper expired %d reservations older than %.0f s", len(expired), older_than_s)
            if on_expired is not None:
                await on_expired(expired)
        return len(expired)

    # ---- background retry of deferred settles ----
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._retry_loop(), name="usage-settle-retry")

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._pending:
            try:
                await asyncio.wait_for(self.flush(), flush_timeout_s)
            except Exception as exc:
                if not database_down(exc):
                    raise
            # The sweeper will expire these rows unbilled; the log keeps the real numbers for a repair.
            for s in self._pending.values():
                log.error(
                    "usage settlement lost at shutdown: request_id=%s status=%s prompt_tokens=%d "
                    "cached_tokens=%d completion_tokens=%d finish_reason=%s",
                    s.request_id,
                    s.status,
                    s.prompt_tokens,
                    s.cached_tokens,
                    s.completion_tokens,
                    s.finish_reason,
                )
            self._pending.clear()

    async def flush(self) -> int:
        """Write every deferred settlement now; returns how many are still waiting. Raises if the
        database is still down."""
        for request_id, settlement in list(self._pending.items()):
            try:
                await asyncio.wait_for(self._write(settlement), self._timeout)
            except Exception as exc:
                if database_down(exc):
                    raise
                log.exception("usage settlement of %s can never be written; dropped", request_id)
            self._pending.pop(request_id, None)
        return len(self._pending)

    async def _retry_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay = self._retry_s
            while self._pending:
                await asyncio.sleep(delay)
                try:
                    await self.flush()
                    log.info("deferred usage settlements written")
                except Exception as exc:
                    if not database_down(exc):
                        raise
                    delay = min(delay * 2, self._max_retry_s)
                    log.warning(
                        "%d usage settlements still wait for the database: %s", len(self._pending), exc
                    )

    async def _insert(self, row: UsageRecord) -> None:
        async with self._writer, self._session_maker() as session:
            session.add(row)
            await session.commit()

    async def _write(self, s: Settlement) -> bool:
        query = (
            update(UsageRecord)
            .where(
                UsageRecord.request_id == s.request_id,
                UsageRecord.status.in_((STATUS_RESERVED, STATUS_EXPIRED)),
            )
            .values(
                status=s.status,
                prompt_tokens=s.prompt_tokens,
                cached_tokens=s.cached_tokens,
                completion_tokens=s.completion_tokens,
                finish_reason=s.finish_reason,
                queue_time_s=s.queue_time_s,
                ttft_s=s.ttft_s,
                latency_s=s.latency_s,
                settled_at=s.settled_at,
                updated_at=datetime.now(UTC),
            )
            .execution_options(synchronize_session=False)
        )
        async with self._writer, self._session_maker() as session:
            result: Any = await session.execute(query)
            await session.commit()
        return int(result.rowcount or 0) == 1
