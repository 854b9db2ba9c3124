"""Uploading real PEFT adapters through the API into moto's S3 server, and reading them back."""

from __future__ import annotations

import hashlib

import pytest

from app.db.session import session_maker
from app.domain.adapters.deps import object_store
from app.domain.adapters.service import AdapterIntegrityError, download_adapter, resolve_adapter


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("r", "targets", "rslora"),
    [
        (1, ("q_proj",), False),
        (8, ("q_proj", "k_proj", "v_proj", "o_proj"), True),
        (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
    ],
)
def test_peft_adapter_uploads_unchanged(app, make_tenant, make_adapter, upload, s3_keys, r, targets, rslora):
    tenant = make_tenant()
    folder = make_adapter(r=r, target_modules=targets, alpha=2 * r, use_rslora=rslora)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    response = upload(tenant["id"], "support-bot", folder)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "support-bot" and body["version"] == 1 and body["ref"] == "support-bot@1"
    assert body["status"] == "ready" and body["current"] is True
    assert body["rank"] == r and body["alpha"] == 2 * r and body["use_rslora"] is rslora
    assert set(body["target_modules"]) == set(targets)
    assert body["sha256"] == sha256(weights) and body["size_bytes"] == len(weights)
    assert body["warnings"] == []
    prefix = f"adapters/{tenant['id']}/{body['id']}/"
    assert s3_keys(f"adapters/{tenant['id']}/") == [
        prefix + "adapter_config.json",
        prefix + "adapter_model.safetensors",
    ]


def test_download_and_resolve_for_the_completion_path(
    app, client, make_tenant, make_adapter, upload, tmp_path
):
    tenant = make_tenant()
    folder = make_adapter(r=4)
    first = upload(tenant["id"], "bot", folder).json()
    second = upload(tenant["id"], "bot", make_adapter(r=8)).json()

    async def resolve(model: str):
        async with session_maker(app)() as session:
            return await resolve_adapter(session, tenant["id"], model)

    # The app's database pool lives on the test client's event loop; run the queries there.
    current = client.blocking_portal.call(resolve, "bot")
    pinned = client.blocking_portal.call(resolve, "bot@1")
    assert str(current.id) == second["id"] and current.version == 2
    assert str(pinned.id) == first["id"]
    for missing in ("bot@3", "nobody", "bot@0", "bot@01", "BOT", "", "bot@1@1"):
        assert client.blocking_portal.call(resolve, missing) is None

    store = object_store(app)
    dest = download_adapter(store, pinned, tmp_path / "dl")
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        folder / "adapter_model.safetensors"
    ).read_bytes()
    assert (dest / "adapter_config.json").read_bytes() == (folder / "adapter_config.json").read_bytes()

    # Someone overwrites the object behind the registry's back: the download refuses it.
    tampered = tmp_path / "tampered"
    tampered.write_bytes(b"\x00" * 64)
    key = f"adapters/{tenant['id']}/{first['id']}/adapter_model.safetensors"
    store.put_file(key, tampered, sha256=pinned.sha256)
    with pytest.raises(AdapterIntegrityError):
        download_adapter(store, pinned, tmp_path / "dl2")
    assert not (tmp_path / "dl2" / "adapter_model.safetensors").exists()


def test_unknown_config_keys_come_back_as_warnings(app, make_tenant, make_adapter, upload):
    import json

    tenant = make_tenant()
    folder = make_adapter(r=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["experiment_tracker"] = "wandb"
    response = upload(tenant["id"], "warned", folder, config=json.dumps(config).encode())
    assert response.status_code == 201, response.text
    assert response.json()["warnings"] == ["adapter_config: unknown key 'experiment_tracker' ignored"]


def test_versions_are_numbered_listed_and_addressed(
    app, client, admin_headers, make_tenant, make_adapter, upload
):
    tenant = make_tenant()
    base = f"/admin/tenants/{tenant['id']}/adapters"
    v1 = upload(tenant["id"], "bot", make_adapter(r=4)).json()
    v2 = upload(tenant["id"], "bot", make_adapter(r=8)).json()
    other = upload(tenant["id"], "other", make_adapter(r=2)).json()
    assert (v1["version"], v2["version"], other["version"]) == (1, 2, 1)
    assert v2["current"] is True

    listed = client.get(base, headers=admin_headers).json()
    assert listed["total"] == 3
    assert [(a["name"], a["version"], a["current"]) for a in listed["data"]] == [
        ("bot", 1, False),
        ("bot", 2, True),
        ("other", 1, True),
    ]
    assert client.get(f"{base}/bot", headers=admin_headers).json()["id"] == v2["id"]
    assert client.get(f"{base}/bot@1", headers=admin_headers).json()["id"] == v1["id"]
    assert client.get(f"{base}/{v1['id']}", headers=admin_headers).json()["ref"] == "bot@1"
    for missing in ("bot@3", "ghost", "bot@x", "BOT"):
        response = client.get(f"{base}/{missing}", headers=admin_headers)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_a_tenant_key_cannot_use_the_admin_routes(app, client, make_tenant, make_key, make_adapter, upload):
    tenant = make_tenant()
    key = make_key(tenant["id"])
    folder = make_adapter(r=4)
    headers = {"Authorization": f"Bearer {key}"}
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    base = f"/admin/tenants/{tenant['id']}/adapters"
    assert client.post(base, data={"name": "x"}, files=files, headers=headers).status_code == 403
    assert client.get(base, headers=headers).status_code == 403
    assert client.post(base, data={"name": "x"}, files=files).status_code == 401


def test_upload_to_a_missing_tenant(app, make_adapter, upload):
    response = upload("00000000-0000-4000-8000-000000000000", "bot", make_adapter(r=4))
    assert response.status_code == 404 and response.json()["error"]["param"] == "tenant_id"


def test_openapi_describes_the_routes_and_the_multipart_body(app, client):
    schema = client.get("/schema/openapi.json").json()
    collection = schema["paths"]["/admin/tenants/{tenant_id}/adapters"]
    one = schema["paths"]["/admin/tenants/{tenant_id}/adapters/{ref}"]
    ids = {collection["post"]["operationId"], collection["get"]["operationId"]}
    ids |= {one["get"]["operationId"], one["delete"]["operationId"]}
    assert ids == {"uploadAdapter", "listAdapters", "getAdapter", "deleteAdapter"}
    form = collection["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert sorted(form["required"]) == ["adapter_config", "name", "weights"]
    assert form["properties"]["weights"]["format"] == "binary"
