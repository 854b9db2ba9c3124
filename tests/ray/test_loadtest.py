"""The Locust run (loadtests/) against the API on the Ray engine tier: no failures, and the runner's own
check that every successful completion is billed exactly once, seen again from the database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import TEST_ADMIN_KEY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_locust_run_against_the_ray_tier_bills_every_success_once(ray_server: Any) -> None:
    adapters = ray_server.demo_model / "adapters"
    cmd = [
        sys.executable,
        "-m",
        "loadtests.run",
        "--host",
        ray_server.url,
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
        "12",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1500:]
    summary = next(line for line in done.stdout.splitlines() if "successful completions" in line)
    successes = int(summary.split("loadtest: ")[1].split(" ")[0])
    assert successes > 10, summary
    rows = ray_server.usage_rows()
    assert sum(r["status"] == "ok" for r in rows) == successes
    assert not [r for r in rows if r["status"] == "reserved"]
