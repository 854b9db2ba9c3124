"""The orphan sweep: objects no ready or in-flight upload owns are removed, then their dead rows.

Orphans come from uploads that failed while the store was down (their rows are `failed`), uploads whose
process died midway (rows `pending` without a heartbeat for longer than the grace period) and deletions
whose object removal failed (no row at all). An upload in flight touches its `pending` row every
HEARTBEAT_S (registry.py), so a row quiet for PENDING_GRACE belongs to a dead process: `fail_stale_pending`
turns it `failed` (freeing its Idempotency-Key for the retry) within a minute or so, and the orphan sweep
removes its objects and then the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from litestar import Litestar
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.adapters.models import Adapter
from app.storage import ObjectInfo, ObjectStore, StoreUnavailable

log = logging.getLogger(__name__)

PENDING_GRACE = timedelta(seconds=60)  # four missed heartbeats
PENDING_CHECK_S = 20.0
_ROOT = "adapters/"


@dataclass(frozen=True, slots=True)
class SweepReport:
    objects_deleted: int
    rows_deleted: int


def _adapter_id(info: ObjectInfo) -> UUID | None:
    parts = info.key.split("/")
    if len(parts) != 4:
        return None
    try:
        return UUID(parts[2])
    except ValueError:
        return None


async def sweep_orphans(
    session_maker: Callable[[], AsyncSession],
    store: ObjectStore,
    *,
    grace: timedelta = PENDING_GRACE,
    now: datetime | None = None,
) -> SweepReport:
    now = now or datetime.now(UTC)
    stale_before = now - grace
    objects = await asyncio.to_thread(store.list, _ROOT)
    by_id: dict[UUID, list[str]] = {}
    for info in objects:
        if (adapter_id := _adapter_id(info)) is not None:
            by_id.setdefault(adapter_id, []).append(info.key)
    async with session_maker() as session:
        rows = {}
        ids = list(by_id)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            result = await session.execute(
                select(Adapter.id, Adapter.status, Adapter.updated_at).where(Adapter.id.in_(chunk))
            )
            rows.update({row.id: (row.status, row.updated_at) for row in result})

        def is_orphan(adapter_id: UUID) -> bool:
            row = rows.get(adapter_id)
            if row is None:
                return True
            status, updated_at = row
            return status == "failed" or (status == "pending" and updated_at < stale_before)

        deleted, kept = 0, set()
        for adapter_id, keys in by_id.items():
            if not is_orphan(adapter_id):
                continue
            try:
                for key in keys:
                    await asyncio.to_thread(store.delete, key)
                    deleted += 1
            except StoreUnavailable as exc:
                log.warning("orphan sweep: could not delete objects of %s: %s", adapter_id, exc)
                kept.add(adapter_id)
        dead = or_(
            Adapter.status == "failed", (Adapter.status == "pending") & (Adapter.updated_at < stale_before)
        )
        query = delete(Adapter).where(dead)
        if kept:
            query = query.where(Adapter.id.not_in(kept))
        result = await session.execute(query)
        await session.commit()
    rows_deleted = int(getattr(result, "rowcount", 0) or 0)
    if deleted or rows_deleted:
        log.info("orphan sweep removed %d objects and %d dead rows", deleted, rows_deleted)
    return SweepReport(deleted, rows_deleted)


async def fail_stale_pending(
    session_maker: Callable[[], AsyncSession],
    *,
    grace: timedelta = PENDING_GRACE,
    now: datetime | None = None,
) -> int:
    """Turn `pending` rows without a heartbeat for `grace` into `failed`; returns how many."""
    stale_before = (now or datetime.now(UTC)) - grace
    async with session_maker() as session:
        result = await session.execute(
            update(Adapter)
            .where(Adapter.status == "pending", Adapter.updated_at < stale_before)
            .values(status="failed", idempotency_key=None, updated_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )
        await session.commit()
    failed = int(getattr(result, "rowcount", 0) or 0)
    if failed:
        log.warning("%d adapter uploads left pending by a dead process marked failed", failed)
    return failed


@asynccontextmanager
async def adapter_sweeper(app: Litestar) -> AsyncIterator[None]:
    """Run the sweep every LORAPLEX_ADAPTER_SWEEP_INTERVAL_SECONDS while the app lives."""
    from app.db.session import session_maker
    from app.domain.adapters.deps import object_store

    interval = float(app.state.settings.adapter_sweep_interval_seconds)

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await sweep_orphans(session_maker(app), object_store(app))
            except Exception:  # the sweep must never take the app down; it retries next round
                log.exception("orphan sweep failed")

    async def pending_loop() -> None:
        # Cheap (one UPDATE, no store listing), so it runs more often than the orphan sweep.
        while True:
            await asyncio.sleep(min(interval, PENDING_CHECK_S))
            try:
                await fail_stale_pending(session_maker(app))
            except Exception:
                log.exception("pending-upload sweep failed")

    tasks = [
        asyncio.create_task(loop(), name="loraplex-adapter-sweep"),
        asyncio.create_task(pending_loop(), name="loraplex-pending-sweep"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
