"""The app with the adapter registry on real PostgreSQL and moto's S3 server, and real PEFT adapters.

The base model's config.json is placed where the app looks when LORAPLEX_MODEL is unset (the demo model
folder under the data dir), so uploads are checked against it without starting an engine.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MAX_RANK = 16


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    from tests.helpers.hf_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.fixture(scope="session")
def make_adapter(base_dir, tmp_path_factory) -> Callable[..., Path]:
    """make_adapter(r=8, target_modules=("q_proj", "v_proj"), base=None, **kw) -> a real PEFT folder (cached)."""
    from tests.helpers.hf_models import make_peft_adapter

    cache: dict[Any, Path] = {}

    def make(base: Path | None = None, **kwargs: Any) -> Path:
        key = (str(base), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("adapter") / "peft"
            cache[key] = make_peft_adapter(base or base_dir, out, **kwargs)
        return cache[key]

    return make


@pytest.fixture
def store_settings(s3_server) -> dict[str, Any]:
    return {
        "s3_endpoint_url": s3_server["endpoint_url"],
        "s3_bucket": s3_server["bucket"],
        "s3_region": s3_server["region"],
        "s3_access_key_id": s3_server["access_key_id"],
        "s3_secret_access_key": s3_server["secret_access_key"],
    }


@pytest.fixture
def app(build_app, store_settings, base_dir, tmp_path):
    demo = tmp_path / "data" / "demo-model"
    demo.mkdir(parents=True)
    shutil.copy(base_dir / "config.json", demo / "config.json")
    return build_app(max_lora_rank=MAX_RANK, **store_settings)


@pytest.fixture
def s3(s3_server):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        region_name=s3_server["region"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_keys(s3, s3_server) -> Callable[[str], list[str]]:
    """Keys under a prefix. moto keeps one store per process, so tests look only under their tenant."""

    def keys(prefix: str) -> list[str]:
        listed = s3.list_objects_v2(Bucket=s3_server["bucket"], Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    return keys


@pytest.fixture
def upload(client, admin_headers) -> Callable[..., Any]:
    """upload(tenant_id, name, adapter_dir, *, weights=None, config=None, headers=None, filenames=...)."""

    def send(
        tenant_id: str,
        name: str,
        adapter_dir: Path | None = None,
        *,
        weights: bytes | None = None,
        config: bytes | None = None,
        weights_name: str = "adapter_model.safetensors",
        config_name: str = "adapter_config.json",
        headers: dict[str, str] | None = None,
    ) -> Any:
        if weights is None:
            weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
        if config is None:
            config = (adapter_dir / "adapter_config.json").read_bytes()
        files = {
            "adapter_config": (config_name, config, "application/json"),
            "weights": (weights_name, weights, "application/octet-stream"),
        }
        return client.post(
            f"/admin/tenants/{tenant_id}/adapters",
            data={"name": name},
            files=files,
            headers={**admin_headers, **(headers or {})},
        )

    return send
