"""Objects as files under one directory: the embedded default when no S3 is configured."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

from .base import ObjectInfo, ObjectNotFound, StoreUnavailable, check_key

# Metadata lives beside each object; the suffix cannot clash with an app key (keys never end with it
# because `list` hides these files and `check_key` refuses keys that end with it).
_META = ".meta.json"


class LocalObjectStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.endswith(_META):
            raise ValueError(f"invalid object key {key[:100]!r}")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid object key {key[:100]!r}")
        return path

    def put_file(self, key: str, path: Path, *, sha256: str, md5_base64: str | None = None) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copy beside the target, then rename: a reader never sees half a file.
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                shutil.copyfile(path, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                md5 = base64.b64decode(md5_base64).hex() if md5_base64 else None
                Path(f"{tmp}{_META}").write_text(json.dumps({"sha256": sha256, "md5": md5}))
                os.replace(f"{tmp}{_META}", f"{target}{_META}")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
                Path(f"{tmp}{_META}").unlink(missing_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"local object store: {exc}") from exc

    def get_to_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            shutil.copyfile(source, path)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StoreUnavailable(f"local object store: {exc}") from exc

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        meta: dict[str, str | None] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(Path(f"{path}{_META}").read_text())
        modified = datetime.fromtimestamp(st.st_mtime, UTC)
        return ObjectInfo(key, st.st_size, modified, meta.get("sha256"), meta.get("md5"))

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            return self._info(key, path)
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        Path(f"{path}{_META}").unlink(missing_ok=True)
        # Drop now-empty folders so a deleted adapter leaves nothing behind.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def list(self, prefix: str) -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith((_META, ".tmp")):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(self._info(key, path))
        return sorted(found, key=lambda info: info.key)
