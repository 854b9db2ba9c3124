"""/admin/tenants/{tenant_id}/adapters: upload (multipart), list, get and delete. Admin keys only."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, PathParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import require_admin
from app.config import Settings
from app.db.session import session_maker
from app.domain.adapters.deps import ADAPTER_DELETED, base_model_spec, object_store
from app.domain.adapters.openapi import UploadOperation
from app.domain.adapters.registry import AdapterRegistry, check_idempotency_key, require_tenant
from app.domain.adapters.schemas import AdapterList, AdapterOut, to_out
from app.domain.adapters.service import current_versions, find_adapters, list_adapters
from app.domain.adapters.upload import receive_form
from app.errors import ApiError, not_found
from app.validation import AdapterRejected

log = logging.getLogger(__name__)

DbSession = NamedDependency[AsyncSession]
AppSettings = NamedDependency[Settings]
RefParam = Annotated[
    str, PathParameter(description="`name` (every version / the current one), `name@N`, or an id")
]


def _api_error(exc: AdapterRejected) -> ApiError:
    # 413 and 415 are request errors too; the envelope says so for every refusal alike.
    return ApiError(
        exc.status_code, exc.message, code=exc.code, param=exc.param, type="invalid_request_error"
    )


class AdapterController(Controller):
    path = "/admin/tenants/{tenant_id:uuid}/adapters"
    guards = (require_admin,)
    tags = ("admin: adapters",)

    @post(
        "/",
        operation_id="uploadAdapter",
        summary="Upload a LoRA adapter (multipart: name, adapter_config, weights); same name = next version",
        # The body is streamed to disk with this app's own limit (LORAPLEX_MAX_UPLOAD_BYTES), see upload.py.
        request_max_body_size=None,
        status_code=201,
        operation_class=UploadOperation,
    )
    async def upload_adapter(
        self,
        request: Request[Any, Any, Any],
        db_session: DbSession,
        settings: AppSettings,
        tenant_id: FromPath[UUID],
        idempotency_key: Annotated[
            str | None, HeaderParameter(name="Idempotency-Key", required=False)
        ] = None,
    ) -> Response[AdapterOut]:
        key = check_idempotency_key(idempotency_key)
        await require_tenant(db_session, tenant_id)
        # Give the connection back while the body streams in (minutes for a large one): parallel uploads
        # must not hold the pool idle in transaction.
        await db_session.commit()
        base = base_model_spec(settings)
        uploads = settings.data_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        # A private folder per upload; removed whatever happens, so refused files never linger.
        folder = tempfile.mkdtemp(prefix="adapter-", dir=uploads)
        try:
            form = await receive_form(
                request.stream(),
                request.headers.get("content-type"),
                _content_length(request),
                Path(folder),
                settings.max_upload_bytes,
            )
            registry = AdapterRegistry(db_session, object_store(request.app), session_maker(request.app))
            result = await registry.upload(tenant_id, form, base, settings.max_lora_rank, key)
        except AdapterRejected as exc:
            raise _api_error(exc) from None
        except OSError as exc:
            # The upload folder's disk is full or failing: the server's problem, and a retry may succeed.
            log.error("adapter upload: cannot write to %s: %s", uploads, exc)
            raise ApiError(
                503, "The server has no room to receive this upload; retry later", code="insufficient_storage"
            ) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
        current = await current_versions(db_session, tenant_id, {result.adapter.name})
        out = to_out(result.adapter, current=current.get(result.adapter.name) == result.adapter.version)
        return Response(out, status_code=201, headers=headers)

    @get("/", operation_id="listAdapters", summary="List every ready version of this tenant's adapters")
    async def list_tenant_adapters(self, db_session: DbSession, tenant_id: FromPath[UUID]) -> AdapterList:
        await require_tenant(db_session, tenant_id)
        rows = await list_adapters(db_session, tenant_id)
        current = await current_versions(db_session, tenant_id, {r.name for r in rows})
        return AdapterList(
            data=[to_out(r, current=current[r.name] == r.version) for r in rows], total=len(rows)
        )

    @get(
        "/{ref:str}",
        operation_id="getAdapter",
        summary="Get an adapter: `name` (current version), `name@N` or an id",
    )
    async def get_adapter(
        self, db_session: DbSession, tenant_id: FromPath[UUID], ref: RefParam
    ) -> AdapterOut:
        rows = await find_adapters(db_session, tenant_id, ref)
        if not rows:
            raise not_found("Adapter", param="name")
        current = await current_versions(db_session, tenant_id, {rows[0].name})
        row = rows[-1]  # for a bare name: its highest ready version, the current one
        return to_out(row, current=current.get(row.name) == row.version)

    @delete(
        "/{ref:str}",
        operation_id="deleteAdapter",
        summary="Delete `name` (every version), `name@N` (one version) or an id",
        status_code=204,
    )
    async def delete_adapter(
        self, request: Request[Any, Any, Any], db_session: DbSession, tenant_id: FromPath[UUID], ref: RefParam
    ) -> None:
        evict = await AdapterRegistry(db_session, object_store(request.app)).delete(tenant_id, ref)
        for sha256 in evict:
            request.app.emit(ADAPTER_DELETED, sha256=sha256)


def _content_length(request: Request[Any, Any, Any]) -> int | None:
    raw = request.headers.get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        raise ApiError(400, "Content-Length is not a number", param="Content-Length") from None
