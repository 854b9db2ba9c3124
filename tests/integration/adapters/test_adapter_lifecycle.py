"""Deleting versions and names, the adapter_deleted event, Idempotency-Key, and tenant isolation."""

from __future__ import annotations

from typing import Any

import pytest


class EmitRecorder:
    """Stands in for the app's event emitter after start-up: records, then forwards."""

    def __init__(self, emitter: Any) -> None:
        self.emitter = emitter
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_id: str, *args: Any, **kwargs: Any) -> None:
        self.events.append((event_id, kwargs))
        self.emitter.emit(event_id, *args, **kwargs)


@pytest.fixture
def emitted(app, client, monkeypatch) -> list[tuple[str, dict[str, Any]]]:
    recorder = EmitRecorder(app.event_emitter)
    monkeypatch.setattr(app, "event_emitter", recorder)
    return recorder.events


def test_delete_one_version_then_the_name(
    app, client, admin_headers, make_tenant, make_adapter, upload, s3_keys, emitted
):
    tenant = make_tenant()
    base = f"/admin/tenants/{tenant['id']}/adapters"
    v1 = upload(tenant["id"], "bot", make_adapter(r=4)).json()
    v2 = upload(tenant["id"], "bot", make_adapter(r=8)).json()
    v3 = upload(tenant["id"], "bot", make_adapter(r=2)).json()
    prefix = f"adapters/{tenant['id']}/"
    assert len(s3_keys(prefix)) == 6

    # Deleting the current version makes the previous one current.
    assert client.delete(f"{base}/bot@3", headers=admin_headers).status_code == 204
    assert emitted == [("adapter_deleted", {"sha256": v3["sha256"]})]
    current = client.get(f"{base}/bot", headers=admin_headers).json()
    assert current["id"] == v2["id"] and current["current"] is True
    assert client.get(f"{base}/bot@3", headers=admin_headers).status_code == 404
    assert not any(v3["id"] in key for key in s3_keys(prefix))
    assert client.delete(f"{base}/bot@3", headers=admin_headers).status_code == 404

    # A bare name deletes every version.
    assert client.delete(f"{base}/bot", headers=admin_headers).status_code == 204
    assert sorted(e[1]["sha256"] for e in emitted[1:]) == sorted([v1["sha256"], v2["sha256"]])
    assert client.get(f"{base}/bot", headers=admin_headers).status_code == 404
    assert client.get(base, headers=admin_headers).json()["total"] == 0
    assert s3_keys(prefix) == []


def test_content_still_used_elsewhere_is_not_evicted(
    app, client, admin_headers, make_tenant, make_adapter, upload, emitted
):
    a, b = make_tenant(), make_tenant()
    folder = make_adapter(r=4)
    upload(a["id"], "same", folder)
    shared = upload(b["id"], "same", folder).json()
    assert client.delete(f"/admin/tenants/{a['id']}/adapters/same", headers=admin_headers).status_code == 204
    assert emitted == []  # tenant b still serves those exact bytes
    assert client.delete(f"/admin/tenants/{b['id']}/adapters/same", headers=admin_headers).status_code == 204
    assert emitted == [("adapter_deleted", {"sha256": shared["sha256"]})]


def test_another_tenants_adapter_is_404_by_name_and_by_id(
    app, client, admin_headers, make_tenant, make_adapter, upload, s3_keys
):
    owner, other = make_tenant(), make_tenant()
    mine = upload(owner["id"], "secret-bot", make_adapter(r=4)).json()
    theirs = f"/admin/tenants/{other['id']}/adapters"
    for ref in ("secret-bot", "secret-bot@1", mine["id"]):
        got = client.get(f"{theirs}/{ref}", headers=admin_headers)
        assert got.status_code == 404, ref
        assert got.json()["error"]["code"] == "not_found"
        assert client.delete(f"{theirs}/{ref}", headers=admin_headers).status_code == 404, ref
    assert client.get(theirs, headers=admin_headers).json() == {"data": [], "total": 0}
    # The owner's adapter is untouched, objects included.
    assert (
        client.get(f"/admin/tenants/{owner['id']}/adapters/{mine['id']}", headers=admin_headers).status_code
        == 200
    )
    assert len(s3_keys(f"adapters/{owner['id']}/{mine['id']}/")) == 2
    # The same name in another tenant is a separate adapter with its own version 1.
    again = upload(other["id"], "secret-bot", make_adapter(r=8)).json()
    assert again["version"] == 1 and again["id"] != mine["id"]


def test_idempotency_key_makes_one_adapter(app, client, admin_headers, make_tenant, make_adapter, upload):
    tenant = make_tenant()
    folder = make_adapter(r=4)
    key = {"Idempotency-Key": "upload-7f3a"}
    first = upload(tenant["id"], "bot", folder, headers=key)
    retry = upload(tenant["id"], "bot", folder, headers=key)
    assert first.status_code == retry.status_code == 201
    assert retry.json()["id"] == first.json()["id"] and retry.json()["version"] == 1
    assert retry.headers.get("idempotent-replayed") == "true"
    assert client.get(f"/admin/tenants/{tenant['id']}/adapters", headers=admin_headers).json()["total"] == 1

    reused = upload(tenant["id"], "bot", make_adapter(r=8), headers=key)
    assert reused.status_code == 409 and reused.json()["error"]["param"] == "Idempotency-Key"
    # The key is per tenant: another tenant may use the same string.
    other = make_tenant()
    assert upload(other["id"], "bot", folder, headers=key).json()["id"] != first.json()["id"]
    # Without the key, the same upload is a new version.
    assert upload(tenant["id"], "bot", folder).json()["version"] == 2
    too_long = upload(tenant["id"], "bot", folder, headers={"Idempotency-Key": "k" * 300})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "invalid_idempotency_key"


async def test_concurrent_uploads_of_one_name_get_distinct_versions(
    app, async_client, admin_headers, make_adapter
):
    import asyncio

    tenant = (await async_client.post("/admin/tenants", json={"name": "busy"}, headers=admin_headers)).json()
    folder = make_adapter(r=4)
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    url = f"/admin/tenants/{tenant['id']}/adapters"
    responses = await asyncio.gather(
        *(async_client.post(url, data={"name": "bot"}, files=files, headers=admin_headers) for _ in range(4))
    )
    assert [r.status_code for r in responses] == [201] * 4, [r.text for r in responses]
    assert sorted(r.json()["version"] for r in responses) == [1, 2, 3, 4]
    current = (await async_client.get(f"{url}/bot", headers=admin_headers)).json()
    assert current["version"] == 4 and current["current"] is True


def test_idempotency_key_of_an_upload_still_running_is_409(
    app, client, admin_headers, make_tenant, make_adapter, upload
):
    import uuid

    from app.db.session import session_maker
    from app.domain.adapters.models import Adapter

    tenant = make_tenant()

    async def start_an_upload() -> None:
        async with session_maker(app)() as session:
            session.add(
                Adapter(
                    tenant_id=uuid.UUID(tenant["id"]),
                    name="bot",
                    status="pending",
                    rank=4,
                    alpha=8.0,
                    use_rslora=False,
                    target_modules=["q_proj"],
                    sha256="0" * 64,
                    config_sha256="0" * 64,
                    size_bytes=1,
                    warnings=[],
                    idempotency_key="in-flight",
                )
            )
            await session.commit()

    client.blocking_portal.call(start_an_upload)
    response = upload(tenant["id"], "bot", make_adapter(r=4), headers={"Idempotency-Key": "in-flight"})
    assert response.status_code == 409 and "in progress" in response.json()["error"]["message"]
    # A pending row is invisible: the name has no ready version yet.
    assert client.get(f"/admin/tenants/{tenant['id']}/adapters/bot", headers=admin_headers).status_code == 404
