"""Writing the registry: upload (validate -> pending row -> store and verify -> ready) and delete.

No half states: a row turns `ready` only in the commit after both objects are stored and verified, and
that same commit makes it the current version (current = highest ready version). When the store fails,
the row turns `failed` and its objects are removed now if the store allows, else by the orphan sweep.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import anyio
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.adapters.models import CONFIG_FILE, WEIGHTS_FILE, Adapter, object_prefix
from app.domain.adapters.service import NAME_RULE, find_adapters, is_valid_name
from app.domain.adapters.upload import ReceivedFile, ReceivedForm
from app.domain.tenants.models import Tenant
from app.errors import ApiError, conflict, not_found
from app.storage import ObjectStore, StoreUnavailable
from app.validation import AdapterRejected, BaseModelSpec, ValidatedAdapter, validate_adapter

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
_VERSION_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class UploadResult:
    adapter: Adapter
    replayed: bool  # an earlier request with the same Idempotency-Key already made it


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(
            400,
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters",
            code="invalid_idempotency_key",
            param="Idempotency-Key",
        )
    return key


def check_name(name: str) -> str:
    if not is_valid_name(name):
        raise AdapterRejected("invalid_name", f"name: {NAME_RULE} (and not shaped like a UUID)", param="name")
    return name


async def require_tenant(session: AsyncSession, tenant_id: UUID) -> None:
    if await session.get(Tenant, tenant_id) is None:
        raise not_found("Tenant", param="tenant_id")


def _store_and_verify(store: ObjectStore, prefix: str, files: list[tuple[str, ReceivedFile]]) -> None:
    """Blocking. Put each file, then read back what the store holds; any mismatch is a store failure."""
    for filename, received in files:
        key = prefix + filename
        store.put_file(key, received.path, sha256=received.sha256, md5_base64=received.md5_base64)
        info = store.stat(key)
        md5_hex = base64.b64decode(received.md5_base64).hex()
        if (
            info is None
            or info.size != received.size
            or (info.sha256 is not None and info.sha256 != received.sha256)
            or (info.md5 is not None and info.md5 != md5_hex)
        ):
            raise StoreUnavailable(f"object {key} does not match what was uploaded")


def _remove_objects(store: ObjectStore, prefix: str) -> bool:
    """Blocking, best effort: True when both objects are gone."""
    try:
        for filename in (WEIGHTS_FILE, CONFIG_FILE):
            store.delete(prefix + filename)
    except StoreUnavailable as exc:
        log.warning("could not remove %s now, the orphan sweep will: %s", prefix, exc)
        return False
    return True


# A pending row's updated_at is touched this often while its files travel to the store, so the pending
# sweep (sweep.py) can tell an upload in flight from one whose process died.
HEARTBEAT_S = 15.0


@asynccontextmanager
async def _heartbeat(
    session_maker: Callable[[], AsyncSession] | None, adapter_id: UUID
) -> AsyncIterator[None]:
    async def beat() -> None:
        assert session_maker is not None
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                async with session_maker() as session:
                    await session.execute(
                        update(Adapter)
                        .where(Adapter.id == adapter_id, Adapter.status == "pending")
                        .values(updated_at=datetime.now(UTC))
                        .execution_options(synchronize_session=False)
                    )
                    await session.commit()
            except Exception:
                log.warning("upload %s: heartbeat not written", adapter_id, exc_info=True)

    task = asyncio.create_task(beat()) if session_maker is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class AdapterRegistry:
    def __init__(
        self,
        session: AsyncSession,
        store: ObjectStore,
        session_maker: Callable[[], AsyncSession] | None = None,
    ) -> None:
        self.session = session
        self.store = store
        self.session_maker = session_maker  # for the heartbeat of long uploads (its own connection)

    async def _replay(self, tenant_id: UUID, key: str, form: ReceivedForm) -> Adapter | None:
        row = (
            await self.session.scalars(
                select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.idempotency_key == key)
            )
        ).first()
        if row is None:
            return None
        if row.status != "ready":
            raise conflict(
                "An upload with this Idempotency-Key is still in progress", param="Idempotency-Key"
            )
        same = (row.name, row.sha256, row.config_sha256) == (
            form.name,
            form.weights.sha256,
            form.adapter_config.sha256,
        )
        if not same:
            raise conflict("This Idempotency-Key was used for a different upload", param="Idempotency-Key")
        return row

    async def upload(
        self,
        tenant_id: UUID,
        form: ReceivedForm,
        base: BaseModelSpec,
        max_rank: int,
        idempotency_key: str | None,
    ) -> UploadResult:
        check_name(form.name)
        if idempotency_key and (previous := await self._replay(tenant_id, idempotency_key, form)):
            return UploadResult(previous, replayed=True)
        checked = await asyncio.to_thread(
            validate_adapter, form.adapter_config.path, form.weights.path, base, max_rank
        )
        adapter = await self._add_pending(tenant_id, form, checked, idempotency_key)
        # Kept apart from the row: after a rollback its attributes expire, and reading one would need I/O.
        adapter_id = adapter.id
        prefix = object_prefix(tenant_id, adapter_id)
        files = [(WEIGHTS_FILE, form.weights), (CONFIG_FILE, form.adapter_config)]
        try:
            try:
                async with _heartbeat(self.session_maker, adapter_id):
                    await asyncio.to_thread(_store_and_verify, self.store, prefix, files)
            except (StoreUnavailable, OSError) as exc:
                log.error("adapter upload %s failed in the object store: %s", adapter_id, exc)
                raise ApiError(
                    503,
                    "The object store is unavailable; the adapter was not saved. Retry later.",
                    code="object_store_unavailable",
                ) from None
            await self._make_ready(adapter)
        except BaseException:
            # Whatever went wrong (the store, a lost version race, a cancelled request), the row must not
            # stay `pending`: it turns `failed` and frees its Idempotency-Key for the retry.
            with anyio.CancelScope(shield=True):
                await self._fail(adapter_id, prefix)
            raise
        log.info(
            "adapter %s ready: rank %d, %s, sha256 %s, %d bytes",
            adapter.ref, adapter.rank, ",".join(adapter.target_modules), adapter.sha256[:12], adapter.size_bytes,
        )  # fmt: skip
        return UploadResult(adapter, replayed=False)

    async def _add_pending(
        self, tenant_id: UUID, form: ReceivedForm, checked: ValidatedAdapter, idempotency_key: str | None
    ) -> Adapter:
        spec = checked.spec
        adapter = Adapter(
            id=uuid4(),
            tenant_id=tenant_id,
            name=form.name,
            version=None,
            status="pending",
            rank=spec.rank,
            alpha=spec.alpha,
            use_rslora=spec.use_rslora,
            target_modules=list(spec.target_modules),
            sha256=form.weights.sha256,
            config_sha256=form.adapter_config.sha256,
            size_bytes=form.weights.size,
            warnings=list(spec.warnings),
            idempotency_key=idempotency_key,
        )
        self.session.add(adapter)
        try:
            # Committed before any object is written: the sweep can always tell whose objects they are.
            await self.session.commit()
        except IntegrityError:
            await self.session.rollback()
            raise conflict(
                "An upload with this Idempotency-Key is still in progress", param="Idempotency-Key"
            ) from None
        return adapter

    async def _fail(self, adapter_id: UUID, prefix: str) -> None:
        """Best effort: mark the row failed (unless it became ready) and remove its objects now if the
        store allows; what is left, the orphan sweep removes."""
        try:
            await self.session.rollback()
            result: Any = await self.session.execute(
                update(Adapter)
                .where(Adapter.id == adapter_id, Adapter.status == "pending")
                .values(status="failed", idempotency_key=None, updated_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            )
            await self.session.commit()
            if int(result.rowcount or 0) != 1:
                return  # it became ready after all (its objects are in use), or the sweep took it
            if await asyncio.to_thread(_remove_objects, self.store, prefix):
                await self.session.execute(
                    delete(Adapter)
                    .where(Adapter.id == adapter_id, Adapter.status == "failed")
                    .execution_options(synchronize_session=False)
                )
                await self.session.commit()
        except Exception:
            log.warning("could not mark upload %s failed; the pending sweep will", adapter_id, exc_info=True)

    async def _make_ready(self, adapter: Adapter) -> None:
        """Give the row the next version of its name and make it ready, in one statement.

        The version is counted inside the UPDATE, so in SQLite (one writer at a time) two uploads can
        never take the same number; in PostgreSQL the tenant's row is locked first, so concurrent uploads
        of one tenant take their numbers one after the other. A collision left over (another process's
        lock-free path) is retried."""
        # Read before any rollback: a rollback expires the instance and reading it again would need I/O.
        adapter_id, tenant_id, name = adapter.id, adapter.tenant_id, adapter.name
        same_name = (Adapter.tenant_id == tenant_id) & (Adapter.name == name)
        next_version = select(func.coalesce(func.max(Adapter.version), 0) + 1).where(same_name)
        for attempt in range(_VERSION_ATTEMPTS):
            try:
                if self.session.get_bind().dialect.name != "sqlite":
                    await self.session.execute(
                        select(Tenant.id).where(Tenant.id == tenant_id).with_for_update()
                    )
                result: Any = await self.session.execute(
                    update(Adapter)
                    .where(Adapter.id == adapter_id, Adapter.status == "pending")
                    .values(
                        version=next_version.scalar_subquery(), status="ready", updated_at=datetime.now(UTC)
                    )
                    .execution_options(synchronize_session=False)
                )
                if int(result.rowcount or 0) != 1:
                    # The pending sweep took this upload for a dead one: nothing usable is left.
                    await self.session.rollback()
                    raise ApiError(
                        503, "The upload took too long and was abandoned; upload again", code="upload_expired"
                    )
                await self.session.commit()
            except IntegrityError:
                await self.session.rollback()
                await asyncio.sleep(random.uniform(0.0, 0.05 * (attempt + 1)))
                continue
            await self.session.refresh(adapter)
            return
        raise conflict("Too many concurrent uploads of this name; retry", param="name")

    async def delete(self, tenant_id: UUID, ref: str) -> list[str]:
        """Delete `name` (every version), `name@N` or an id; returns content hashes no longer in use."""
        rows = await find_adapters(self.session, tenant_id, ref)
        if not rows:
            raise not_found("Adapter", param="name")
        prefixes = [object_prefix(tenant_id, row.id) for row in rows]
        hashes = {row.sha256 for row in rows}
        for row in rows:
            await self.session.delete(row)
        # Rows go first: a row without objects would be a broken adapter; objects without a row are
        # orphans that the sweep removes if deleting them now fails.
        await self.session.commit()
        log.info("deleted %s of tenant %s: %s", ref, tenant_id, ", ".join(row.ref for row in rows))
        for prefix in prefixes:
            await asyncio.to_thread(_remove_objects, self.store, prefix)
        still_used = set(
            await self.session.scalars(
                select(Adapter.sha256).where(Adapter.sha256.in_(hashes), Adapter.status == "ready")
            )
        )
        return sorted(hashes - still_used)
