"""Local disk cache of adapter files, keyed by content sha256, between the object store and the engine.

A request makes sure its adapter is on disk (download in a worker thread) before it reaches the engine;
the engine's loader callback then only reads `local_folder(sha)`, and fetches again from the store if the
folder vanished or no longer matches its hash. A folder appears only complete and verified: files land
in a temporary folder first, the hash is checked, then it is renamed into place.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.adapter_format import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

# download(adapter_row, dest_dir): writes both files of that adapter version into dest_dir.
Download = Callable[[Any, Path], object]


def _is_sha(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class AdapterFiles:
    """`max_bytes` bounds the folder: least recently used adapters go first, but never one used in the
    last `min_age_s` seconds (the engine may still be reading it); the loader fetches a trimmed one again."""

    def __init__(
        self, root: Path, download: Download, max_bytes: int | None = None, min_age_s: float = 300.0
    ) -> None:
        self.root = root
        self._download = download
        self._max_bytes = max_bytes
        self._min_age_s = min_age_s
        self._known: dict[str, Any] = {}  # sha -> adapter row, so the loader thread can fetch again
        self._verified: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._used: dict[str, float] = {}  # sha -> monotonic time of last use
        # Half-written downloads of a process that died are never complete: drop them.
        for tmp in root.glob(".tmp-*") if root.is_dir() else ():
            shutil.rmtree(tmp, ignore_errors=True)
        # Folders left by an earlier run count against the budget and go first (never used by this one).
        self._sizes: dict[str, int] = {
            d.name: _size(d) for d in (root.iterdir() if root.is_dir() else ()) if _is_sha(d.name)
        }

    def disk_bytes(self) -> int:
        return sum(list(self._sizes.values()))  # a copy: other threads add entries meanwhile

    def folder(self, sha: str) -> Path:
        if not _is_sha(sha):
            # The hash becomes a path: anything but lowercase hex could walk out of the cache folder.
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / sha

    async def ensure(self, adapter: Any) -> Path:
        """The verified local folder of this adapter version, downloading it first when needed."""
        sha = str(adapter.sha256)
        self._known[sha] = adapter
        self._used[sha] = time.monotonic()
        if sha in self._verified and (self.folder(sha) / WEIGHTS_FILE).is_file():
            return self.folder(sha)
        return await asyncio.to_thread(self._fetch, sha)

    def local_folder(self, content_hash: str) -> str:
        """The engine's loader callback (any thread): a folder whose weights hash to `content_hash`."""
        self._used[content_hash] = time.monotonic()
        if content_hash in self._verified and (self.folder(content_hash) / WEIGHTS_FILE).is_file():
            return str(self.folder(content_hash))
        if content_hash not in self._known:
            raise FileNotFoundError(f"adapter {content_hash[:12]} is not known to this server")
        return str(self._fetch(content_hash))

    def remove(self, sha: str) -> None:
        """Forget an adapter (deleted from the registry): its files go, a later load fails."""
        with self._lock_for(sha):
            self._known.pop(sha, None)
            self._verified.discard(sha)
            self._sizes.pop(sha, None)
            shutil.rmtree(self.folder(sha), ignore_errors=True)

    def _lock_for(self, sha: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sha, threading.Lock())

    def _fetch(self, sha: str) -> Path:
        final = self._fetch_locked(sha)
        # Outside the lock: trimming takes other adapters' locks, and two fetches must not wait on each other.
        self._trim(keep=sha)
        return final

    def _trim(self, keep: str) -> None:
        if self._max_bytes is None:
            return
        now = time.monotonic()
        for sha in sorted(list(self._sizes), key=lambda s: self._used.get(s, 0.0)):
            if self.disk_bytes() <= self._max_bytes:
                return
            if sha == keep or now - self._used.get(sha, float("-inf")) < self._min_age_s:
                continue
            lock = self._lock_for(sha)
            if not lock.acquire(blocking=False):
                continue  # being fetched right now
            try:
                self._verified.discard(sha)
                self._sizes.pop(sha, None)
                shutil.rmtree(self.folder(sha), ignore_errors=True)
                log.info("adapter %s trimmed from the disk cache", sha[:12])
            finally:
                lock.release()
        if self.disk_bytes() > self._max_bytes:
            log.warning("adapter disk cache over budget: every adapter in it was used recently")

    def _fetch_locked(self, sha: str) -> Path:
        final = self.folder(sha)
        with self._lock_for(sha):
            if (final / WEIGHTS_FILE).is_file() and sha256_file(final / WEIGHTS_FILE) == sha:
                self._verified.add(sha)
                self._sizes[sha] = _size(final)
                return final
            adapter = self._known.get(sha)
            if adapter is None:
                raise FileNotFoundError(f"adapter {sha[:12]} was deleted")
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{sha[:16]}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                self._download(adapter, tmp)
                got = sha256_file(tmp / WEIGHTS_FILE)
                if got != sha:
                    raise ValueError(f"adapter {sha[:12]}: downloaded weights hash to {got[:12]}")
                if not (tmp / CONFIG_FILE).is_file():
                    raise FileNotFoundError(f"adapter {sha[:12]}: no {CONFIG_FILE} in the store")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._verified.add(sha)
            self._sizes[sha] = _size(final)
            log.info("adapter %s cached on disk", sha[:12])
            return final
