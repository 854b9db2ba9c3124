"""Objects in any S3-compatible server (AWS, MinIO, moto) through boto3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .base import ObjectInfo, ObjectNotFound, StoreUnavailable, check_key

_CHUNK = 1024 * 1024
# A single PUT may carry at most 5 GiB; beyond that boto3's managed multipart upload is used.
_SINGLE_PUT_MAX = 5 * 1024**3


class S3ObjectStore:
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.bucket = bucket
        config = Config(
            # Newer boto3 adds CRC checksums to every request by default; MinIO, moto and other
            # non-AWS servers do not all accept them, so checksums are sent only where S3 demands one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Custom endpoints rarely have per-bucket DNS names.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    @staticmethod
    def _missing(exc: ClientError) -> bool:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_file(self, key: str, path: Path, *, sha256: str, md5_base64: str | None = None) -> None:
        check_key(key)
        size = path.stat().st_size
        try:
            if size <= _SINGLE_PUT_MAX:
                extra = {"ContentMD5": md5_base64} if md5_base64 else {}
                with open(path, "rb") as body:
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=body,
                        ContentLength=size,
                        Metadata={"sha256": sha256},
                        **extra,
                    )
            else:
                self._client.upload_file(
                    str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}}
                )
        except (BotoCoreError, ClientError, OSError) as exc:
            raise StoreUnavailable(f"S3 put {key}: {exc}") from exc

    def get_to_file(self, key: str, path: Path) -> None:
        check_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            with open(path, "wb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    out.write(chunk)
        except ClientError as exc:
            if self._missing(exc):
                raise ObjectNotFound(key) from None
            raise StoreUnavailable(f"S3 get {key}: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"S3 get {key}: {exc}") from exc

    def stat(self, key: str) -> ObjectInfo | None:
        check_key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise StoreUnavailable(f"S3 head {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 head {key}: {exc}") from exc
        etag = str(head.get("ETag", "")).strip('"')
        # The ETag is the content's md5 only for single-part objects stored unencrypted or with SSE-S3;
        # with KMS or customer keys it is something else, and then only size and sha256 are compared.
        plain = head.get("ServerSideEncryption") in (None, "AES256") and "SSECustomerAlgorithm" not in head
        is_md5 = len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
        md5 = etag if plain and is_md5 else None
        sha256 = head.get("Metadata", {}).get("sha256")
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"], sha256, md5)

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(f"S3 delete {key}: {exc}") from exc

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(item["Key"], int(item["Size"]), item["LastModified"]))
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(f"S3 list {prefix}: {exc}") from exc
        return found
