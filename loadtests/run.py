"""Headless load test with a bounded run time: set up tenants, run Locust, then check the bill.

    python -m loadtests.run --host http://127.0.0.1:8000 --admin-key "$LORAPLEX_ADMIN_KEY" \\
        --adapter-dir data/demo-model/adapters/demo-a --run-time 60 --users 20

Against the engine on Ray Serve, point --host at `loraplex serve --ray` (same checks;
tests/ray/test_loadtest.py runs it there). Exit status is non-zero when Locust saw any failure, or when
the usage rows written during the run do not equal the completions Locust counted as successful (every
successful request is billed exactly once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent


def api(client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    resp = client.request(method, path, **kw)
    if resp.status_code >= 300:
        raise SystemExit(f"setup: {method} {path} -> {resp.status_code} {resp.text[:300]}")
    return resp.json()


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"setup: {client.base_url} not ready after {timeout_s:.0f}s")


def upload(client: httpx.Client, tenant_id: str, name: str, folder: Path) -> None:
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    api(client, "POST", f"/admin/tenants/{tenant_id}/adapters", data={"name": name}, files=files)


def set_up(client: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    adapter_dirs = [Path(p) for p in args.adapter_dir]
    run_tag = uuid.uuid4().hex[:6]
    tenants = []
    for i in range(args.tenants):
        tenant = api(client, "POST", "/admin/tenants", json={"name": f"load-{run_tag}-{i}"})
        key = api(client, "POST", f"/admin/tenants/{tenant['id']}/api-keys", json={"name": "load"})["key"]
        names = []
        for j, folder in enumerate(adapter_dirs):
            upload(client, tenant["id"], f"load-{j}", folder)
            names.append(f"load-{j}")
        tenants.append(
            {
                "tenant_id": tenant["id"],
                "key": key,
                "adapters": names,
                # Shared by all of this tenant's users, so its prefix cache has something to hit.
                "system_prompt": f"You are the assistant of customer {i}. Answer briefly and politely.",
            }
        )
    models = api(client, "GET", "/v1/models", headers={"Authorization": f"Bearer {tenants[0]['key']}"})
    return {
        "base_model": next(m["id"] for m in models["data"] if m["parent"] is None),
        "admin_key": args.admin_key,
        "tenants": tenants,
        "upload_adapter_dir": str(adapter_dirs[0]),
        "max_tokens": args.max_tokens,
    }


def run_locust(args: argparse.Namespace, setup_file: Path, csv_prefix: Path) -> int:
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.users),
        "--run-time",
        f"{args.run_time}s",
        # Users finish the request in flight at the end, so nothing is cut off mid-stream.
        "--stop-timeout",
        "30",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--exit-code-on-error",
        "1",
    ]
    env = {
        **os.environ,
        "LORAPLEX_LOADTEST_SETUP": str(setup_file),
        "LORAPLEX_LOADTEST_COUNTS": str(csv_prefix) + "_counts.json",
    }
    return subprocess.run(cmd, env=env, check=False, timeout=args.run_time + 120).returncode


def successful_completions(counts_file: Path) -> tuple[int, int]:
    """Counted by the locustfile's request listener as requests ended (the CSV can miss the last ones)."""
    counts = json.loads(counts_file.read_text())
    return int(counts["ok"]), int(counts["failed"])


def billed_requests(client: httpx.Client, setup: dict[str, Any], start: datetime) -> int:
    total = 0
    end = datetime.now(UTC) + timedelta(minutes=1)
    for tenant in setup["tenants"]:
        rows = api(
            client,
            "GET",
            "/admin/usage",
            params={
                "tenant_id": tenant["tenant_id"],
                "group_by": "tenant",
                "start": start.isoformat(),
                "end": end.isoformat(),
            },
        )
        total += sum(int(r["requests"]) for r in rows["data"])
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--admin-key", default=os.environ.get("LORAPLEX_ADMIN_KEY"))
    p.add_argument("--adapter-dir", action="append", required=True, help="PEFT folder to upload (repeatable)")
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--run-time", type=int, default=20, help="seconds")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--ready-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if not args.admin_key:
        p.error("--admin-key or LORAPLEX_ADMIN_KEY is required")
    headers = {"Authorization": f"Bearer {args.admin_key}"}
    with (
        httpx.Client(base_url=args.host, headers=headers, timeout=60) as client,
        tempfile.TemporaryDirectory() as d,
    ):
        wait_ready(client, args.ready_timeout)
        setup = set_up(client, args)
        setup_file = Path(d) / "setup.json"
        setup_file.write_text(json.dumps(setup))
        start = datetime.now(UTC) - timedelta(seconds=1)
        code = run_locust(args, setup_file, Path(d) / "stats")
        ok, failed = successful_completions(Path(d) / "stats_counts.json")
        billed = billed_requests(client, setup, start)
    print(f"loadtest: {ok} successful completions, {failed} failed, {billed} usage rows")
    if code != 0 or failed:
        print(f"loadtest: FAILED (locust exit {code}, {failed} failed completions)")
        return 1
    if ok == 0 or billed != ok:
        print(f"loadtest: FAILED (usage rows {billed} != successful completions {ok})")
        return 1
    print("loadtest: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
