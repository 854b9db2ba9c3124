"""Billing queries: settled usage rows summed per tenant, day (UTC) or adapter, as rows or CSV.

Reserved rows (requests still running) are left out until they settle; `error` and `expired` rows
(failed on our side, or swept after a crash) count as requests with zero billed tokens. Totals are plain sums of the token columns, so they equal the
sum of the `usage` objects the API returned for the same requests.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.tenants.models import Tenant
from app.domain.usage.models import BILLED_STATUSES, STATUS_RESERVED, UsageRecord

GROUP_BY = ("tenant", "day", "adapter")
SUMS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")
KEYS = {
    "tenant": ("tenant_id", "tenant_name"),
    "day": ("tenant_id", "tenant_name", "day"),
    "adapter": ("tenant_id", "tenant_name", "adapter_id", "adapter_version", "model"),
}


def columns(group_by: str) -> tuple[str, ...]:
    return (*KEYS[group_by], *SUMS)


def _day(session: AsyncSession) -> ColumnElement[Any]:
    if session.bind is not None and session.bind.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d", UsageRecord.created_at)
    return func.to_char(func.timezone("UTC", UsageRecord.created_at), "YYYY-MM-DD")


def _billed(column: Any) -> Any:
    return func.coalesce(func.sum(case((UsageRecord.status.in_(BILLED_STATUSES), column), else_=0)), 0)


async def usage_rows(
    session: AsyncSession, *, start: datetime, end: datetime, tenant_id: UUID | None, group_by: str
) -> list[dict[str, Any]]:
    """One dict per group, keys as `columns(group_by)`, ordered by tenant name then the group keys."""
    keys: list[Any] = [UsageRecord.tenant_id, Tenant.name]
    order: list[Any] = [Tenant.name, UsageRecord.tenant_id]
    extra: list[Any] = []
    if group_by == "day":
        day = _day(session)
        keys.append(day)
        order.append(day)
    elif group_by == "adapter":
        keys += [UsageRecord.adapter_id, UsageRecord.adapter_version]
        order += [UsageRecord.adapter_id, UsageRecord.adapter_version]
        # One adapter version may be asked for as `name` or `name@N`; show one of them.
        extra.append(func.max(UsageRecord.model))
    query = (
        select(
            *keys,
            *extra,
            func.count(UsageRecord.id),
            _billed(UsageRecord.prompt_tokens),
            _billed(UsageRecord.cached_tokens),
            _billed(UsageRecord.completion_tokens),
        )
        .join(Tenant, Tenant.id == UsageRecord.tenant_id)
        .where(
            UsageRecord.status != STATUS_RESERVED,
            UsageRecord.created_at >= start,
            UsageRecord.created_at < end,
        )
        .group_by(*keys)
        .order_by(*order)
    )
    if tenant_id is not None:
        query = query.where(UsageRecord.tenant_id == tenant_id)
    rows = []
    for values in (await session.execute(query)).all():
        *group, requests, prompt_sum, cached_sum, completion_sum = values
        row: dict[str, Any] = dict(zip(KEYS[group_by], group, strict=True))
        row["tenant_id"] = str(row["tenant_id"])
        if row.get("adapter_id") is not None:
            row["adapter_id"] = str(row["adapter_id"])
        row.update(
            requests=int(requests),
            prompt_tokens=int(prompt_sum),
            cached_tokens=int(cached_sum),
            completion_tokens=int(completion_sum),
            total_tokens=int(prompt_sum) + int(completion_sum),
        )
        rows.append(row)
    return rows


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {name: sum(int(r[name]) for r in rows) for name in SUMS}


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A spreadsheet would run a cell starting with one of these as a formula (CSV injection).
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def to_csv(rows: list[dict[str, Any]], group_by: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = columns(group_by)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in header])
    return out.getvalue()
