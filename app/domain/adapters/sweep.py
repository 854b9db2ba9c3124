"""The orphan sweep: objects no ready or in-flight upload owns are removed, then their dead rows.

Orphans come from uploads that failed while the store was down (their rows are `failed`), uploads whose
process died midway (rows `pending` for longer than the grace period) and deletions whose object removal
failed (no row at all). A `pending` row younger than the grace period is an upload in flight: left alone.
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
from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.adapters.models import Adapter
from app.storage import ObjectInfo, ObjectStore, StoreUnavailable

log = logging.getLogger(__name__)

PENDING_GRACE = timedelta(hours=1)
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

    task = asyncio.create_task(loop(), name="loraplex-adapter-sweep")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
