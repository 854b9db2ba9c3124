"""A short, bounded Locust run against a live server (demo model, CPU): no failures, and every successful
completion billed exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import TEST_ADMIN_KEY, LiveServer

ROOT = Path(__file__).resolve().parents[2]


def test_short_locust_run_has_no_failures_and_bills_every_success(live_server: LiveServer) -> None:
    adapters = live_server.demo_model / "adapters"
    cmd = [
        sys.executable,
        "-m",
        "loadtests.run",
        "--host",
        live_server.url,
        "--admin-key",
        TEST_ADMIN_KEY,
        "--adapter-dir",
        str(adapters / "demo-attn"),
        "--adapter-dir",
        str(adapters / "demo-mlp"),
        "--tenants",
        "2",
        "--users",
        "6",
        "--run-time",
        "15",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    report = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1500:]
    summary = next(line for line in done.stdout.splitlines() if "successful completions" in line)
    successes = int(summary.split("loadtest: ")[1].split(" ")[0])
    assert successes > 10, summary
    # Locust's own table holds the custom metrics next to the requests.
    assert "ttft_ms" in report and "tokens_per_s" in report
    # The runner's check, seen from the database (this module's server served only the load test).
    rows = live_server.usage_rows()
    assert sum(r["status"] == "ok" for r in rows) == successes
    assert not [r for r in rows if r["status"] == "reserved"]
