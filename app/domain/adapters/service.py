"""Reading the registry: tenant-scoped lookups by name, `name@N` or id, and fetching an adapter's files.

`resolve_adapter`, `list_adapters` and `download_adapter` are the seam the completion path uses
(docs/adapters.md). Every query here filters on the tenant: another tenant's adapter is simply absent.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from uuid import UUID

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.adapters.models import CONFIG_FILE, WEIGHTS_FILE, Adapter, object_prefix
from app.storage import ObjectStore

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
_REF = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>[1-9][0-9]{0,8}))?")
_UUID_SHAPE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class AdapterIntegrityError(RuntimeError):
    """Files fetched from the store do not match the sha256 recorded when they were uploaded."""


def is_valid_name(name: str) -> bool:
    # UUID-shaped names are refused so that a path segment is never ambiguous between a name and an id.
    return NAME_PATTERN.fullmatch(name) is not None and _UUID_SHAPE.fullmatch(name) is None


def parse_ref(ref: str) -> tuple[str, int | None] | None:
    """`name` -> (name, None); `name@N` -> (name, N); anything else -> None."""
    match = _REF.fullmatch(ref)
    if match is None:
        return None
    version = match["version"]
    return match["name"], int(version) if version else None


def _as_uuid(value: UUID | str) -> UUID | None:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


def _ready(tenant_id: UUID) -> Select[Adapter]:
    return select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.status == "ready")


async def resolve_adapter(session: AsyncSession, tenant_id: UUID | str, model_name: str) -> Adapter | None:
    """This tenant's ready adapter for `name` (its current version) or `name@N`; None when there is none."""
    tenant = _as_uuid(tenant_id)
    parsed = parse_ref(model_name) if isinstance(model_name, str) else None
    if tenant is None or parsed is None:
        return None
    name, version = parsed
    query = _ready(tenant).where(Adapter.name == name)
    if version is not None:
        query = query.where(Adapter.version == version)
    else:
        query = query.order_by(Adapter.version.desc()).limit(1)
    return (await session.scalars(query)).first()


async def find_adapters(session: AsyncSession, tenant_id: UUID, ref: str) -> list[Adapter]:
    """Ready rows a path segment names: an id, `name@N` (one version) or `name` (every version)."""
    if (adapter_id := _as_uuid(ref)) is not None:
        return list(await session.scalars(_ready(tenant_id).where(Adapter.id == adapter_id)))
    parsed = parse_ref(ref)
    if parsed is None:
        return []
    name, version = parsed
    query = _ready(tenant_id).where(Adapter.name == name)
    if version is not None:
        query = query.where(Adapter.version == version)
    return list(await session.scalars(query.order_by(Adapter.version)))


async def list_adapters(session: AsyncSession, tenant_id: UUID | str) -> list[Adapter]:
    """Every ready version of every adapter of this tenant, by name then version."""
    tenant = _as_uuid(tenant_id)
    if tenant is None:
        return []
    return list(await session.scalars(_ready(tenant).order_by(Adapter.name, Adapter.version)))


async def current_versions(session: AsyncSession, tenant_id: UUID, names: set[str]) -> dict[str, int]:
    """name -> its current (highest ready) version."""
    if not names:
        return {}
    query = (
        select(Adapter.name, func.max(Adapter.version))
        .where(Adapter.tenant_id == tenant_id, Adapter.status == "ready", Adapter.name.in_(names))
        .group_by(Adapter.name)
    )
    return {name: version for name, version in (await session.execute(query)).all() if version is not None}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_adapter(store: ObjectStore, adapter: Adapter, dest_dir: str | Path) -> Path:
    """Blocking: write adapter_config.json and adapter_model.safetensors of `adapter` into `dest_dir`.

    Both files' sha256 are checked against the row; on a mismatch the files are removed and
    AdapterIntegrityError is raised, so a tampered or corrupted object never reaches the engine.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    prefix = object_prefix(adapter.tenant_id, adapter.id)
    checks = ((WEIGHTS_FILE, adapter.sha256), (CONFIG_FILE, adapter.config_sha256))
    for filename, expected in checks:
        path = dest / filename
        store.get_to_file(prefix + filename, path)
        got = _sha256_file(path)
        if got != expected:
            for name, _ in checks:
                (dest / name).unlink(missing_ok=True)
            raise AdapterIntegrityError(
                f"adapter {adapter.id}: {filename} hashes to {got[:12]}, the registry recorded {expected[:12]}"
            )
    return dest
