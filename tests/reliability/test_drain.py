"""SIGTERM during 20 running streams, against a real `loraplex serve` process (demo model on CPU, SQLite):
every stream finishes with `[DONE]`, `/ready` and new requests are 503 meanwhile, every usage row is
settled with the tokens the client was told, and the process exits 0.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.serve_process import Served, serve_process

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

STREAMS = 20
MAX_TOKENS = 200  # a few seconds per stream on two shared cores: long enough to be cut by the signal


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve_process(tmp_path, max_model_len="512", shutdown_timeout="60") as server:
        yield server


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
    assert still_running > 0, "every stream ended before the checks: nothing was drained"
    assert served.admin.get("/health").status_code == 200

    for t in threads:
        t.join(timeout=120)
    code = served.proc.wait(timeout=120)
    took = time.monotonic() - signalled

    assert code == 0, served.log_tail()
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
