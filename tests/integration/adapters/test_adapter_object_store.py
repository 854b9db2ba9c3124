"""Both object stores behind one interface: moto's real S3 server over HTTP, and a local directory."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.storage import LocalObjectStore, ObjectNotFound, ObjectStore, S3ObjectStore, StoreUnavailable


@pytest.fixture(params=["s3", "local"])
def store(request, tmp_path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
        return
    s3 = request.getfixturevalue("s3_server")
    yield S3ObjectStore(
        s3["bucket"],
        endpoint_url=s3["endpoint_url"],
        region=s3["region"],
        access_key_id=s3["access_key_id"],
        secret_access_key=s3["secret_access_key"],
    )


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_put_stat_get_list_delete_round_trip(store, tmp_path):
    # moto keeps one store per process: a fresh root keeps other tests' objects out of the listing.
    root = f"r{uuid.uuid4().hex}/"
    data = bytes(range(256)) * 1000
    src, sha = _file(tmp_path, "w", data)
    store.put_file(root + "adapters/t1/a1/adapter_model.safetensors", src, sha256=sha)
    store.put_file(root + "adapters/t1/a2/adapter_model.safetensors", src, sha256=sha)
    store.put_file(root + "adapters/t2/a3/adapter_model.safetensors", src, sha256=sha)

    info = store.stat(root + "adapters/t1/a1/adapter_model.safetensors")
    assert info is not None and info.size == len(data) and info.sha256 == sha
    assert info.last_modified.tzinfo is not None

    out = tmp_path / "out"
    store.get_to_file(root + "adapters/t1/a1/adapter_model.safetensors", out)
    assert out.read_bytes() == data

    keys = [i.key for i in store.list(root + "adapters/t1/")]
    assert sorted(keys) == [
        root + "adapters/t1/a1/adapter_model.safetensors",
        root + "adapters/t1/a2/adapter_model.safetensors",
    ]

    store.delete(root + "adapters/t1/a1/adapter_model.safetensors")
    store.delete(root + "adapters/t1/a1/adapter_model.safetensors")  # absent: not an error
    assert store.stat(root + "adapters/t1/a1/adapter_model.safetensors") is None
    assert sorted(i.key for i in store.list(root + "adapters/")) == [
        root + "adapters/t1/a2/adapter_model.safetensors",
        root + "adapters/t2/a3/adapter_model.safetensors",
    ]
    with pytest.raises(ObjectNotFound):
        store.get_to_file(root + "adapters/t1/a1/adapter_model.safetensors", out)


def test_keys_that_could_escape_are_refused(store, tmp_path):
    src, sha = _file(tmp_path, "w", b"x")
    for key in ("../escape", "/abs/key", "a//b", "a/../b", "a\\b", ".hidden/x", "", "a/./b", "k" * 600):
        with pytest.raises(ValueError):
            store.put_file(key, src, sha256=sha)
        with pytest.raises(ValueError):
            store.get_to_file(key, tmp_path / "out")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_s3_reports_the_md5_of_what_it_stored(s3_server, tmp_path):
    import base64

    store = S3ObjectStore(
        s3_server["bucket"], endpoint_url=s3_server["endpoint_url"], region=s3_server["region"],
        access_key_id="testing", secret_access_key="testing",
    )  # fmt: skip
    src, sha = _file(tmp_path, "w", b"payload")
    md5 = hashlib.md5(b"payload")
    store.put_file("k/good", src, sha256=sha, md5_base64=base64.b64encode(md5.digest()).decode())
    info = store.stat("k/good")
    assert info is not None and info.md5 == md5.hexdigest() and info.sha256 == sha


def test_s3_down_is_store_unavailable(tmp_path):
    from tests.integration.conftest import free_port

    store = S3ObjectStore(
        "bucket", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
        access_key_id="x", secret_access_key="y", max_attempts=1, connect_timeout=1,
    )  # fmt: skip
    src, sha = _file(tmp_path, "w", b"x")
    for call in (
        lambda: store.put_file("k/x", src, sha256=sha),
        lambda: store.stat("k/x"),
        lambda: store.list("k/"),
        lambda: store.delete("k/x"),
        lambda: store.get_to_file("k/x", tmp_path / "o"),
    ):
        with pytest.raises(StoreUnavailable):
            call()


def test_local_store_leaves_no_empty_folders_or_temp_files(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    src, sha = _file(tmp_path, "w", b"abc")
    store.put_file("adapters/t/a/w", src, sha256=sha)
    assert [p.name for p in (tmp_path / "objects/adapters/t/a").iterdir() if p.name.endswith(".tmp")] == []
    store.delete("adapters/t/a/w")
    assert list((tmp_path / "objects").iterdir()) == []
