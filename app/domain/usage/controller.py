"""Billing routes: `GET /admin/usage` (admin, or a billing key for its own tenant) and `GET /v1/usage`
(any tenant key, its own tenant only); JSON, or CSV with `Accept: text/csv`. And `GET /metrics`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.guards import require_billing, require_tenant
from app.auth.principal import Principal
from app.domain.completions.schemas import ErrorEnvelope
from app.domain.usage.billing import GROUP_BY, to_csv, totals, usage_rows
from app.domain.usage.lifespan import metrics_of
from app.errors import ApiError

MAX_RANGE = timedelta(days=3700)
_ERRORS = {
    400: "A query parameter is invalid (`param` names it)",
    401: "Missing or unknown API key",
    403: "The key may not read this usage",
    503: "The database is unreachable; retry after `Retry-After`",
}
ERROR_RESPONSES = {
    status: ResponseSpec(data_container=ErrorEnvelope, description=text, generate_examples=False)
    for status, text in _ERRORS.items()
}


class UsageRow(msgspec.Struct):
    tenant_id: str
    tenant_name: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    day: str | None = None
    adapter_id: str | None = None
    adapter_version: int | None = None
    model: str | None = None


class UsageTotals(msgspec.Struct):
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(msgspec.Struct):
    object: str
    group_by: str
    start: datetime
    end: datetime
    data: list[UsageRow]
    totals: UsageTotals


def _instant(value: str | None, name: str, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(
            400, f"'{name}' must be an ISO 8601 date or date-time, e.g. 2026-11-01", param=name
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        parsed = datetime.min.replace(tzinfo=UTC)  # outside the range below: refused there
    # The database cannot hold every date Python can; nothing was metered outside these years anyway.
    if not 2000 <= parsed.year <= 2999:
        raise ApiError(400, f"'{name}' must be between the years 2000 and 2999", param=name)
    return parsed


def _range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    begin = _instant(start, "start", month_start)
    finish = _instant(end, "end", now + timedelta(seconds=1))
    if finish <= begin:
        raise ApiError(400, "'end' must be after 'start'", param="end")
    if finish - begin > MAX_RANGE:
        raise ApiError(400, "the range from 'start' to 'end' may span at most ten years", param="end")
    return begin, finish


def _tenant(value: str | None) -> UUID | None:
    # Parsed here, not by Litestar, so a bad id is the 400 this route documents (Litestar's would be 422).
    if value is None or value == "":
        return None
    try:
        return UUID(value)
    except ValueError:
        raise ApiError(400, "'tenant_id' must be a tenant's id (a UUID)", param="tenant_id") from None


def _group(group_by: str) -> str:
    if group_by not in GROUP_BY:
        raise ApiError(400, f"'group_by' must be one of {', '.join(GROUP_BY)}", param="group_by")
    return group_by


async def _report(
    request: Request[Any, Any, Any],
    session: AsyncSession,
    tenant_id: UUID | None,
    start: str | None,
    end: str | None,
    group_by: str,
) -> Response[Any]:
    group = _group(group_by)
    begin, finish = _range(start, end)
    rows = await usage_rows(session, start=begin, end=finish, tenant_id=tenant_id, group_by=group)
    if "text/csv" in request.headers.get("accept", ""):
        day = begin.date().isoformat()
        return Response(
            content=to_csv(rows, group),
            # Litestar adds "; charset=utf-8" to text/* itself; naming it here too printed it twice.
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="usage-{group}-{day}.csv"'},
        )
    report = UsageReport(
        object="usage",
        group_by=group,
        start=begin,
        end=finish,
        data=[msgspec.convert(r, UsageRow) for r in rows],
        totals=UsageTotals(**totals(rows)),
    )
    return Response(content=report)


@get(
    "/admin/usage",
    operation_id="getUsage",
    summary="Usage per tenant, day or adapter (JSON, or CSV with Accept: text/csv)",
    guards=[require_billing],
    tags=["billing"],
    responses=ERROR_RESPONSES,
)
async def admin_usage(
    request: Request[Any, Any, Any],
    db_session: AsyncSession,
    principal: Principal,
    tenant_id: str | None = Parameter(default=None, description="Only this tenant (its id, a UUID)"),
    start: str | None = Parameter(
        default=None, description="Inclusive; ISO date or date-time (UTC if no zone)"
    ),
    end: str | None = Parameter(
        default=None, description="Exclusive; ISO date or date-time (UTC if no zone)"
    ),
    group_by: str = Parameter(default="tenant", description="tenant | day | adapter"),
) -> Response[UsageReport]:
    wanted = _tenant(tenant_id)
    if not principal.is_admin:
        # A billing key reads its own tenant, whatever it asks for.
        if wanted is not None and wanted != principal.tenant_id:
            raise ApiError(403, "A billing key can only read its own tenant's usage", code="forbidden_tenant")
        wanted = principal.tenant_id
    return await _report(request, db_session, wanted, start, end, group_by)


@get(
    "/v1/usage",
    operation_id="getOwnUsage",
    summary="The calling tenant's own usage (JSON, or CSV with Accept: text/csv)",
    guards=[require_tenant],
    tags=["billing"],
    responses=ERROR_RESPONSES,
)
async def own_usage(
    request: Request[Any, Any, Any],
    db_session: AsyncSession,
    principal: Principal,
    start: str | None = Parameter(
        default=None, description="Inclusive; ISO date or date-time (UTC if no zone)"
    ),
    end: str | None = Parameter(
        default=None, description="Exclusive; ISO date or date-time (UTC if no zone)"
    ),
    group_by: str = Parameter(default="day", description="tenant | day | adapter"),
) -> Response[UsageReport]:
    return await _report(request, db_session, principal.tenant_id, start, end, group_by)


@get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics (vLLM's names)",
    exclude_from_auth=True,
    tags=["operations"],
    media_type="text/plain",
)
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    body, content_type = metrics_of(request.app).render()
    return Response(content=body, media_type=content_type)
