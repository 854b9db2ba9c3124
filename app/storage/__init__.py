"""Where adapter files live: S3 when configured, else a local directory, behind one interface."""

from __future__ import annotations

from pathlib import Path

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StoreUnavailable, check_key
from .local import LocalObjectStore
from .s3 import S3ObjectStore


def make_object_store(
    *,
    data_dir: Path,
    s3_bucket: str | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_access_key_id: str | None = None,
    s3_secret_access_key: str | None = None,
) -> ObjectStore:
    """S3 when a bucket is set; otherwise objects under `data_dir/objects` (the embedded default)."""
    if s3_bucket:
        return S3ObjectStore(
            s3_bucket,
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            access_key_id=s3_access_key_id,
            secret_access_key=s3_secret_access_key,
        )
    return LocalObjectStore(Path(data_dir) / "objects")


__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3ObjectStore",
    "StoreUnavailable",
    "check_key",
    "make_object_store",
]
