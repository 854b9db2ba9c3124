"""`loraplex serve` as a real subprocess on loopback (demo model on CPU, SQLite under a temporary folder),
for tests that need the process itself: its signals, its exit code, its event loop measured from outside.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import free_port
from tests.reliability.conftest import ServeProcess

ADMIN_KEY = "lpx_reliabilityadminkey0123456789"


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    admin: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.admin = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )

    def tenant_key(self, **limits: Any) -> str:
        tenant = self.admin.post("/admin/tenants", json={"name": f"rel-{uuid.uuid4().hex[:8]}", **limits})
        assert tenant.status_code == 201, tenant.text
        key = self.admin.post(f"/admin/tenants/{tenant.json()['id']}/api-keys", json={"name": "rel"})
        assert key.status_code == 201, key.text
        return str(key.json()["key"])

    def usage_rows(self) -> dict[str, dict[str, Any]]:
        with sqlite3.connect(self.data_dir / "loraplex.db") as db:
            db.row_factory = sqlite3.Row
            return {r["request_id"]: dict(r) for r in db.execute("SELECT * FROM usage_records")}

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def serve_process(tmp_path: Path, **settings: str) -> Iterator[Served]:
    """Start `python -m app.cli serve` with the demo model; yields once /ready is 200; kills it after."""
    from engine.demo import write_demo_model

    model = write_demo_model(tmp_path / "demo-model")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")},
        "LORAPLEX_DATA_DIR": str(tmp_path / "data"),
        "LORAPLEX_MODEL": str(model),
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_SECRET": "reliability-secret-0123456789",
        "LORAPLEX_KV_CACHE_BYTES": str(16 << 20),
        "LORAPLEX_LOG_FORMAT": "json",
        **{f"LORAPLEX_{k.upper()}": v for k, v in settings.items()},
    }
    process = ServeProcess(env, tmp_path / "server.log")
    process.start(timeout=180)
    assert process.proc is not None
    server = Served(process.url, process.proc, tmp_path / "data", process.log_path)
    try:
        yield server
    finally:
        server.admin.close()
        if process.proc.poll() is None:
            process.kill9()
