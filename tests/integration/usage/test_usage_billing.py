"""Billing through the API on the real PostgreSQL: /admin/usage (JSON and CSV, grouped by tenant, day,
adapter), /v1/usage, who may read what, bad input, and /metrics without tenant or key labels."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.domain.usage.models import UsageRecord
from tests.integration.usage.usage_db import metering_on

ADAPTER = uuid.uuid4()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _meter(url: str, rows: list[dict[str, Any]]) -> None:
    async with metering_on(url) as (metering, engine):
        for r in rows:
            await metering.reserve(
                r["id"],
                r["tenant"],
                None,
                r.get("adapter"),
                r.get("version"),
                r.get("model", "base"),
                r["p"],
                16,
            )
            if r.get("status", "ok") != "reserved":
                await metering.settle(r["id"], r["p"], r.get("c", 0), r["g"], "stop", r.get("status", "ok"))
            if r.get("last_month"):
                from sqlalchemy.ext.asyncio import async_sessionmaker

                async with async_sessionmaker(engine)() as session:
                    old = datetime.now(UTC).replace(day=1) - timedelta(days=3)
                    await session.execute(
                        update(UsageRecord).where(UsageRecord.request_id == r["id"]).values(created_at=old)
                    )
                    await session.commit()


@pytest.fixture
def billed(client, make_tenant, make_key, app_settings):  # type: ignore[no-untyped-def]
    a, b = make_tenant(name="acme"), make_tenant(name="globex")
    rows = [
        {"id": "a1", "tenant": a["id"], "p": 10, "g": 5},
        {
            "id": "a2",
            "tenant": a["id"],
            "p": 20,
            "g": 7,
            "c": 4,
            "adapter": ADAPTER,
            "version": 1,
            "model": "bot",
        },
        {
            "id": "a3",
            "tenant": a["id"],
            "p": 3,
            "g": 1,
            "status": "aborted",
            "adapter": ADAPTER,
            "version": 1,
            "model": "bot@1",
        },
        {"id": "a4", "tenant": a["id"], "p": 999, "g": 0, "status": "reserved"},  # still running: not billed
        {"id": "a5", "tenant": a["id"], "p": 500, "g": 500, "last_month": True},  # outside the default range
        {
            "id": "a6",
            "tenant": a["id"],
            "p": 70,
            "g": 9,
            "c": 5,
            "status": "error",
        },  # failed on our side: free
        {"id": "b1", "tenant": b["id"], "p": 100, "g": 50, "model": '=HYPERLINK("http://evil")'},
    ]
    asyncio.run(_meter(app_settings.database_url, rows))
    return {
        "a": a,
        "b": b,
        "a_billing": make_key(a["id"], scopes=("billing",)),
        "b_billing": make_key(b["id"], scopes=("billing",)),
        "b_completions": make_key(b["id"], scopes=("completions",)),
    }


def test_admin_sees_every_tenant_grouped_by_tenant(client, admin_headers, billed) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/admin/usage", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "usage" and body["group_by"] == "tenant"
    rows = {row["tenant_name"]: row for row in body["data"]}
    assert set(rows) == {"acme", "globex"}
    acme = rows["acme"]
    assert (acme["requests"], acme["prompt_tokens"], acme["cached_tokens"], acme["completion_tokens"]) == (
        4,
        33,
        4,
        13,
    )
    assert acme["total_tokens"] == 46 and acme["tenant_id"] == billed["a"]["id"]
    # Totals are the plain sums of what each request's usage object said; failed requests cost nothing.
    assert body["totals"] == {
        "requests": 5,
        "prompt_tokens": 133,
        "cached_tokens": 4,
        "completion_tokens": 63,
        "total_tokens": 196,
    }
    only_b = client.get("/admin/usage", params={"tenant_id": billed["b"]["id"]}, headers=admin_headers).json()
    assert [row["tenant_name"] for row in only_b["data"]] == ["globex"]


def test_group_by_adapter_and_day(client, admin_headers, billed) -> None:  # type: ignore[no-untyped-def]
    params = {"tenant_id": billed["a"]["id"], "group_by": "adapter"}
    rows = client.get("/admin/usage", params=params, headers=admin_headers).json()["data"]
    by_adapter = {(row["adapter_id"], row["adapter_version"]): row for row in rows}
    assert set(by_adapter) == {(None, None), (str(ADAPTER), 1)}
    assert by_adapter[(str(ADAPTER), 1)]["requests"] == 2
    assert by_adapter[(str(ADAPTER), 1)]["total_tokens"] == 31
    assert by_adapter[(None, None)]["model"] == "base"

    days = client.get("/admin/usage", params={"group_by": "day"}, headers=admin_headers).json()["data"]
    today = datetime.now(UTC).date().isoformat()
    assert {(row["tenant_name"], row["day"]) for row in days} == {("acme", today), ("globex", today)}

    last_month = (datetime.now(UTC).replace(day=1) - timedelta(days=3)).date()
    old = client.get(
        "/admin/usage",
        params={
            "group_by": "day",
            "start": last_month.isoformat(),
            "end": (last_month + timedelta(days=1)).isoformat(),
        },
        headers=admin_headers,
    ).json()
    assert [(row["day"], row["total_tokens"]) for row in old["data"]] == [(last_month.isoformat(), 1000)]


def test_csv_export_is_escaped(client, admin_headers, billed) -> None:  # type: ignore[no-untyped-def]
    r = client.get(
        "/admin/usage", params={"group_by": "adapter"}, headers={**admin_headers, "Accept": "text/csv"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert list(table[0]) == [
        "tenant_id",
        "tenant_name",
        "adapter_id",
        "adapter_version",
        "model",
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "total_tokens",
    ]
    assert sum(int(row["total_tokens"]) for row in table) == 196
    globex = next(row for row in table if row["tenant_name"] == "globex")
    assert globex["model"] == '\'=HYPERLINK("http://evil")'  # a spreadsheet shows it, never runs it


def test_billing_key_sees_only_its_own_tenant(client, billed) -> None:  # type: ignore[no-untyped-def]
    b = bearer(billed["b_billing"])
    rows = client.get("/admin/usage", params={"group_by": "adapter"}, headers=b).json()["data"]
    assert {row["tenant_name"] for row in rows} == {"globex"}
    refused = client.get("/admin/usage", params={"tenant_id": billed["a"]["id"]}, headers=b)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden_tenant"
    csv_text = client.get(
        "/admin/usage", params={"group_by": "adapter"}, headers={**b, "Accept": "text/csv"}
    ).text
    assert "acme" not in csv_text and billed["a"]["id"] not in csv_text
    # A completions key is no billing key; no key at all is no caller.
    assert client.get("/admin/usage", headers=bearer(billed["b_completions"])).status_code == 403
    assert client.get("/admin/usage").status_code == 401
    own = client.get("/admin/usage", headers=bearer(billed["a_billing"])).json()
    assert [row["tenant_name"] for row in own["data"]] == ["acme"]


def test_v1_usage_is_the_callers_own(client, admin_headers, billed) -> None:  # type: ignore[no-untyped-def]
    for key in (billed["b_completions"], billed["b_billing"]):
        body = client.get("/v1/usage", params={"tenant_id": billed["a"]["id"]}, headers=bearer(key)).json()
        assert {row["tenant_name"] for row in body["data"]} == {"globex"}
        assert body["group_by"] == "day" and body["totals"]["total_tokens"] == 150
    # The admin key belongs to no tenant.
    assert client.get("/v1/usage", headers=admin_headers).status_code == 403


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "key"}, "group_by"),
        ({"group_by": "tenant; DROP TABLE usage_records"}, "group_by"),
        ({"start": "2026-01-01' OR '1'='1"}, "start"),
        ({"start": "yesterday"}, "start"),
        ({"end": "2026-13-01"}, "end"),
        ({"start": "2026-05-02", "end": "2026-05-01"}, "end"),
        ({"start": "2001-01-01", "end": "2100-01-01"}, "end"),
        ({"start": "0001-01-01T00:00:00+14:00"}, "start"),
        ({"end": "9999-12-31T23:59:59-14:00"}, "end"),
    ],
)
def test_bad_query_names_the_parameter(client, admin_headers, params, param) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/admin/usage", params=params, headers=admin_headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert client.get("/admin/usage", headers=admin_headers).status_code == 200  # the table is still there


def test_bad_tenant_id_is_a_client_error(client, admin_headers) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/admin/usage", params={"tenant_id": "../../etc"}, headers=admin_headers)
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_empty_range_and_timezones(client, admin_headers, billed) -> None:  # type: ignore[no-untyped-def]
    future = client.get("/admin/usage", params={"start": "2099-01-01"}, headers=admin_headers)
    assert future.status_code == 400  # default end (now) is before it
    body = client.get(
        "/admin/usage",
        params={"start": "2099-01-01T00:00:00+02:00", "end": "2099-02-01"},
        headers=admin_headers,
    ).json()
    assert body["data"] == [] and body["totals"]["requests"] == 0
    assert body["start"].startswith("2099-01-01T00:00:00+02:00") or body["start"].startswith(
        "2098-12-31T22:00"
    )
