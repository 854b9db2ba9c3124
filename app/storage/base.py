"""The object store seam: adapter files go in and out through these few blocking calls.

Calls block (boto3 does), so async code runs them in a worker thread. Keys are '/'-separated paths that
the app builds itself; stores still refuse keys that could escape their root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*(/[A-Za-z0-9][A-Za-z0-9._=-]*)*")


class StoreUnavailable(RuntimeError):
    """The store could not be reached or failed; the caller answers 503 and leaves no half state."""


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime  # timezone-aware UTC
    sha256: str | None = None  # as recorded at put time, when the store keeps metadata
    md5: str | None = None  # hex; S3 ETags of single-part, non-KMS objects are the content's md5


def check_key(key: str) -> str:
    """Refuse keys with empty, dot-leading or odd segments ('..', absolute paths, backslashes)."""
    if len(key) > 512 or not _KEY.fullmatch(key):
        raise ValueError(f"invalid object key {key[:100]!r}")
    return key


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path, *, sha256: str, md5_base64: str | None = None) -> None:
        """Store the file at `path` under `key`, recording its sha256; md5 lets the server check the bytes."""

    def get_to_file(self, key: str, path: Path) -> None:
        """Write the object to `path` (created or replaced); ObjectNotFound when absent."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Size, time and recorded sha256 of an object, or None when absent."""

    def delete(self, key: str) -> None:
        """Remove the object; absent objects are not an error."""

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`."""
