"""SIGTERM during 20 running streams, against a real `loraplex serve` process (demo model on CPU, SQLite):
every stream finishes with `[DONE]`, `/ready` and new requests are 503 meanwhile, every usage row is
settled with the tokens the client was told, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import free_port

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ADMIN_KEY = "lpx_draintestadminkey0123456789"
STREAMS = 20
MAX_TOKENS = 200  # a few seconds per stream on two shared cores: long enough to be cut by the signal


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

    def tenant_key(self) -> str:
        tenant = self.admin.post("/admin/tenants", json={"name": "drain"})
        assert tenant.status_code == 201, tenant.text
        key = self.admin.post(f"/admin/tenants/{tenant.json()['id']}/api-keys", json={"name": "drain"})
        assert key.status_code == 201, key.text
        return str(key.json()["key"])

    def usage_rows(self) -> dict[str, dict[str, Any]]:
        with sqlite3.connect(self.data_dir / "loraplex.db") as db:
            db.row_factory = sqlite3.Row
            return {r["request_id"]: dict(r) for r in db.execute("SELECT * FROM usage_records")}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
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
        "LORAPLEX_SECRET": "drain-test-secret-0123456789",
        "LORAPLEX_MAX_MODEL_LEN": "512",
        "LORAPLEX_KV_CACHE_BYTES": str(16 << 20),
        "LORAPLEX_SHUTDOWN_TIMEOUT": "60",
        "LORAPLEX_LOG_FORMAT": "json",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Served(f"http://127.0.0.1:{port}", proc, tmp_path / "data", log)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if server.admin.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("server not ready: " + log.read_text()[-3000:])
        yield server
    finally:
        server.admin.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass
class StreamResult:
    request_id: str | None = None
    done: bool = False
    usage: dict[str, Any] | None = None
    error: str | None = None


def _stream(url: str, key: str, started: threading.Semaphore, result: StreamResult) -> None:
    body = {
        "model": "demo-model",
        "prompt": "a drain test",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    announced = False
    try:
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        ) as r:
            if r.status_code != 200:
                result.error = f"{r.status_code} {r.read()!r}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result.done = True
                    continue
                chunk = json.loads(data)
                result.request_id = chunk.get("id", result.request_id)
                if chunk.get("usage"):
                    result.usage = chunk["usage"]
                if not announced:
                    announced = True
                    started.release()
    except Exception as exc:  # the assertion below reports it
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not announced:
            started.release()


def test_sigterm_drains_running_streams_and_exits_zero(served: Served) -> None:
    key = served.tenant_key()
    started = threading.Semaphore(0)
    results = [StreamResult() for _ in range(STREAMS)]
    threads = [
        threading.Thread(target=_stream, args=(served.url, key, started, r), daemon=True) for r in results
    ]
    for t in threads:
        # One at a time, each streaming before the next starts: the drain is under test here, not how the
        # server takes 20 requests arriving at once (tests/reliability's load tests do that).
        t.start()
        assert started.acquire(timeout=120)
    assert all(r.error is None for r in results), [r.error for r in results if r.error]

    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)

    # At once: not ready, and new work is turned away with a reason and a time to retry.
    ready = served.admin.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["shutdown"] == "draining"
    refused = httpx.post(
        served.url + "/v1/completions",
        json={"model": "demo-model", "prompt": "late", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert int(refused.headers["retry-after"]) > 0
    still_running = sum(t.is_alive() for t in threads)
    assert served.admin.get("/health").status_code == 200

    for t in threads:
        t.join(timeout=120)
    code = served.proc.wait(timeout=120)
    took = time.monotonic() - signalled
    log = served.log.read_text()

    assert code == 0, log[-3000:]
    assert all(r.error is None and r.done for r in results), [(r.error, r.done) for r in results]
    rows = served.usage_rows()
    for r in results:
        assert r.request_id is not None and r.usage is not None
        row = rows[r.request_id]
        assert row["status"] == "ok", row
        assert row["completion_tokens"] == r.usage["completion_tokens"] == MAX_TOKENS
        assert row["prompt_tokens"] == r.usage["prompt_tokens"]
    assert not [row for row in rows.values() if row["status"] == "reserved"]
    print(
        f"\ndrain: {STREAMS} streams ({still_running} still running after the checks) finished, "
        f"exit {code}, {took:.1f}s from SIGTERM to exit"
    )
