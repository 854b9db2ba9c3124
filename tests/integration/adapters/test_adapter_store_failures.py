"""The object store failing: 503, no ready row, and every orphan removed by the sweep."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.db.session import session_maker
from app.domain.adapters.deps import object_store
from app.domain.adapters.models import Adapter
from app.domain.adapters.sweep import sweep_orphans
from app.storage import S3ObjectStore
from tests.integration.conftest import free_port


class ControlledS3:
    """moto's S3 server that a test can stop and start again on the same port (moto keeps the data)."""

    def __init__(self) -> None:
        import boto3

        self.port = free_port()
        self.bucket = f"lpx-{uuid.uuid4().hex[:12]}"
        self.server: Any = None
        self.start()
        boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=self.bucket)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def controlled_s3():
    s3 = ControlledS3()
    yield s3
    s3.stop()


@pytest.fixture
def store_settings(controlled_s3) -> dict[str, Any]:
    return {
        "s3_endpoint_url": controlled_s3.endpoint_url,
        "s3_bucket": controlled_s3.bucket,
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
    }


def rows(client, app, tenant_id: str) -> list[tuple[str, int | None]]:
    async def fetch():
        async with session_maker(app)() as session:
            result = await session.scalars(select(Adapter).where(Adapter.tenant_id == uuid.UUID(tenant_id)))
            return sorted((a.status, a.version) for a in result)

    return client.blocking_portal.call(fetch)


def stored_keys(app, tenant_id: str) -> list[str]:
    return sorted(info.key for info in object_store(app).list(f"adapters/{tenant_id}/"))


def sweep(client, app, **kwargs):
    return client.blocking_portal.call(lambda: sweep_orphans(session_maker(app), object_store(app), **kwargs))


def test_store_down_before_the_upload(app, client, make_tenant, make_adapter, upload, controlled_s3):
    tenant = make_tenant()
    controlled_s3.stop()
    response = upload(tenant["id"], "bot", make_adapter(r=4), headers={"Idempotency-Key": "k1"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "object_store_unavailable"
    assert rows(client, app, tenant["id"]) == [("failed", None)]  # never ready; kept for the sweep

    controlled_s3.start()
    report = sweep(client, app)
    assert report.rows_deleted == 1 and rows(client, app, tenant["id"]) == []
    # The retry with the same key starts afresh and succeeds.
    retry = upload(tenant["id"], "bot", make_adapter(r=4), headers={"Idempotency-Key": "k1"})
    assert retry.status_code == 201 and retry.json()["version"] == 1


def test_store_dies_mid_upload_then_the_sweep_removes_the_orphan(
    app, client, make_tenant, make_adapter, upload, controlled_s3, monkeypatch
):
    tenant = make_tenant()
    real_put = S3ObjectStore.put_file
    puts: list[str] = []

    def put_then_die(self, key, path, **kwargs):
        if puts:  # the second object: the server is gone by now
            controlled_s3.stop()
        puts.append(key)
        return real_put(self, key, path, **kwargs)

    monkeypatch.setattr(S3ObjectStore, "put_file", put_then_die)
    response = upload(tenant["id"], "bot", make_adapter(r=4))
    assert response.status_code == 503, response.text
    assert len(puts) == 2
    assert rows(client, app, tenant["id"]) == [("failed", None)]
    monkeypatch.setattr(S3ObjectStore, "put_file", real_put)

    controlled_s3.start()
    orphan = stored_keys(app, tenant["id"])
    assert len(orphan) == 1 and orphan[0].endswith("adapter_model.safetensors")  # the first object made it
    report = sweep(client, app)
    assert (report.objects_deleted, report.rows_deleted) == (1, 1)
    assert stored_keys(app, tenant["id"]) == [] and rows(client, app, tenant["id"]) == []
    # The failed attempt did not use up a version number.
    assert upload(tenant["id"], "bot", make_adapter(r=4)).json()["version"] == 1


def test_sweep_keeps_live_uploads_and_ready_adapters(
    app, client, make_tenant, make_adapter, upload, tmp_path
):
    tenant = make_tenant()
    ready = upload(tenant["id"], "bot", make_adapter(r=4)).json()
    store = object_store(app)
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 10)

    async def add_pending(age: timedelta) -> str:
        async with session_maker(app)() as session:
            row = Adapter(
                tenant_id=uuid.UUID(tenant["id"]), name="bot", status="pending", rank=4, alpha=8.0,
                use_rslora=False, target_modules=["q_proj"], sha256="0" * 64, config_sha256="0" * 64,
                size_bytes=10, warnings=[],
            )  # fmt: skip
            session.add(row)
            await session.flush()
            row.updated_at = datetime.now(UTC) - age
            await session.commit()
            return str(row.id)

    fresh = client.blocking_portal.call(add_pending, timedelta(minutes=1))
    stale = client.blocking_portal.call(add_pending, timedelta(hours=2))
    no_row = str(uuid.uuid4())
    for adapter_id in (fresh, stale, no_row):
        store.put_file(
            f"adapters/{tenant['id']}/{adapter_id}/adapter_model.safetensors", blob, sha256="0" * 64
        )

    report = sweep(client, app, grace=timedelta(hours=1))
    assert (report.objects_deleted, report.rows_deleted) == (2, 1)
    remaining = stored_keys(app, tenant["id"])
    assert any(fresh in key for key in remaining) and any(ready["id"] in key for key in remaining)
    assert not any(stale in key or no_row in key for key in remaining)
    assert rows(client, app, tenant["id"]) == [("pending", None), ("ready", 1)]


def test_the_app_sweeps_on_its_own(build_app, store_settings, base_dir, tmp_path):
    import shutil

    from litestar.testing import TestClient

    demo = tmp_path / "data" / "demo-model"
    demo.mkdir(parents=True)
    shutil.copy(base_dir / "config.json", demo / "config.json")
    app = build_app(adapter_sweep_interval_seconds=0.2, **store_settings)
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    key = f"adapters/{uuid.uuid4()}/{uuid.uuid4()}/adapter_model.safetensors"
    with TestClient(app):
        store = object_store(app)
        store.put_file(key, blob, sha256="0" * 64)
        deadline = time.monotonic() + 10
        while store.stat(key) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.stat(key) is None


def test_an_upload_the_sweep_gave_up_on_never_turns_ready(
    app, client, make_tenant, make_adapter, upload, migrated_database_url, monkeypatch
):
    import asyncio

    import asyncpg

    tenant = make_tenant()
    real_put = S3ObjectStore.put_file
    dsn = migrated_database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    async def sweep_the_pending_row() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DELETE FROM adapters WHERE status = 'pending'")
        finally:
            await conn.close()

    def slow_put(self, key, path, **kwargs):
        # As if this upload outlived the grace period and the sweep removed its row meanwhile.
        asyncio.run(sweep_the_pending_row())
        return real_put(self, key, path, **kwargs)

    monkeypatch.setattr(S3ObjectStore, "put_file", slow_put)
    response = upload(tenant["id"], "bot", make_adapter(r=4))
    assert response.status_code == 503 and response.json()["error"]["code"] == "upload_expired"
    assert rows(client, app, tenant["id"]) == []
    monkeypatch.setattr(S3ObjectStore, "put_file", real_put)
    sweep(client, app)
    assert stored_keys(app, tenant["id"]) == []


def test_delete_while_the_store_is_down(
    app, client, admin_headers, make_tenant, make_adapter, upload, controlled_s3
):
    tenant = make_tenant()
    assert upload(tenant["id"], "bot", make_adapter(r=4)).status_code == 201
    url = f"/admin/tenants/{tenant['id']}/adapters/bot"
    controlled_s3.stop()
    # The registry forgets the adapter at once; its objects wait for the sweep.
    assert client.delete(url, headers=admin_headers).status_code == 204
    assert client.get(url, headers=admin_headers).status_code == 404
    controlled_s3.start()
    assert len(stored_keys(app, tenant["id"])) == 2
    sweep(client, app)
    assert stored_keys(app, tenant["id"]) == []
    assert rows(client, app, tenant["id"]) == []
