"""A replica's own disk copy of the adapters it serves, written from the bytes the API tier sent.

A replica may run on another machine than the API (no shared disk, no object-store credentials there), so
the request carries a Ray object reference to the adapter's two files; the replica writes them here once,
checks the weights against the content hash (the bytes are never trusted for their name), and the engine's
loader callback reads the folder. Only the two accepted file names are ever written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path

from engine.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from engine.request import LoRARequest

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def read_adapter_files(folder: Path) -> dict[str, bytes]:
    """The API tier's side: the two files of a verified local adapter folder, to send to a replica."""
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}


class ReplicaAdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, content_hash: str) -> Path:
        if len(content_hash) != 64 or any(c not in "0123456789abcdef" for c in content_hash):
            raise ValueError(f"not a sha256 hex digest: {content_hash!r}")
        return self.root / content_hash

    def has(self, content_hash: str) -> bool:
        return (self.folder(content_hash) / WEIGHTS_FILE).is_file()

    def write(self, content_hash: str, files: dict[str, bytes]) -> Path:
        """Blocking: write and verify, then rename into place (a folder is only ever seen complete)."""
        final = self.folder(content_hash)
        if set(files) != set(ADAPTER_FILES):
            raise ValueError(f"adapter {content_hash[:12]}: expected exactly {ADAPTER_FILES}")
        got = hashlib.sha256(files[WEIGHTS_FILE]).hexdigest()
        if got != content_hash:
            raise ValueError(f"adapter {content_hash[:12]}: weights hash to {got[:12]}")
        with self._lock:
            if self.has(content_hash):
                return final
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            for name in ADAPTER_FILES:
                (tmp / name).write_bytes(files[name])
            os.replace(tmp, final)
        return final

    def remove(self, content_hash: str) -> None:
        shutil.rmtree(self.folder(content_hash), ignore_errors=True)

    def loader(self, lora: LoRARequest) -> str:
        """The engine's adapter loader callback: the folder written before the request was submitted."""
        assert lora.content_hash is not None
        if not self.has(lora.content_hash):
            raise FileNotFoundError(f"adapter {lora.content_hash[:12]} is not on this replica")
        return str(self.folder(lora.content_hash))
