"""`/health` stays fast while huge prompts are tokenized and refused: tokenization runs in bounded worker
threads (app/domain/completions/tokenize.py), never on the event loop.

Measured from outside a real `loraplex serve` process, so the client's own threads do not share the
server's GIL.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability.serve_process import Served, serve_process

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SENDERS = 4
SECONDS = 6.0
P99_LIMIT_S = 0.050


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_process(tmp_path_factory.mktemp("event-loop")) as server:
        yield server


def _health_latencies(url: str, stop: threading.Event) -> list[float]:
    seen: list[float] = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            t = time.perf_counter()
            assert client.get("/health").status_code == 200
            seen.append(time.perf_counter() - t)
            time.sleep(0.01)
    return seen


def _flood(url: str, key: str, body: bytes, stop: threading.Event, codes: list[str]) -> None:
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            r = client.post("/v1/completions", content=body, headers=headers)
            codes.append(f"{r.status_code} {r.json()['error']['code']}" if r.status_code != 200 else "200")


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def _under_flood(served: Served, prompt: str) -> tuple[list[float], list[str]]:
    key = served.tenant_key()
    body = json.dumps({"model": "demo-model", "prompt": prompt, "max_tokens": 4}).encode()
    stop = threading.Event()
    codes: list[str] = []
    senders = [
        threading.Thread(target=_flood, args=(served.url, key, body, stop, codes), daemon=True)
        for _ in range(SENDERS)
    ]
    for t in senders:
        t.start()
    time.sleep(0.5)  # the senders are in the middle of their requests
    timer = threading.Timer(SECONDS, stop.set)
    timer.start()
    latencies = _health_latencies(served.url, stop)
    for t in senders:
        t.join(timeout=60)
    return latencies, codes


@pytest.mark.parametrize(
    ("what", "prompt"),
    [
        # 1,000,000 characters: refused after tokenizing only its beginning.
        ("1 MB prompts", "hello world, " * 76_923),
        # Under the prefix shortcut (16 characters a context token), so tokenized in full, then refused.
        ("30 kB prompts", "hello world, " * 2_300),
    ],
)
def test_health_stays_fast_while_huge_prompts_are_refused(served: Served, what: str, prompt: str) -> None:
    latencies, codes = _under_flood(served, prompt)
    assert codes and set(codes) == {"400 context_length_exceeded"}, set(codes)
    p50, p99 = _p(latencies, 50), _p(latencies, 99)
    print(
        f"\n/health while {SENDERS} clients send {what} ({len(codes)} refused in {SECONDS:.0f}s): "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
        f"over {len(latencies)} probes"
    )
    assert p99 < P99_LIMIT_S
