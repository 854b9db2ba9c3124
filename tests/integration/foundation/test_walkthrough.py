"""The documented first run, for real: `loraplex serve` on the embedded defaults in an empty folder, then
the curl walk-through of docs/foundation.md exactly as written (only the port and the key filled in)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "foundation.md"


def _walkthrough_scripts() -> list[str]:
    """The walk-through's bash blocks, in order (each later block runs in the same shell as the earlier)."""
    text = DOC.read_text()
    section = text.split("## Walk-through (curl)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "docs/foundation.md lost its walk-through"
    return blocks


def _wait_for_admin_key(proc: subprocess.Popen[str], deadline: float) -> str:
    """Read stdout in a thread, so a silent server fails the test at the deadline instead of hanging it."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        found = re.search(r"\b(lpx_[0-9A-Za-z]{43})\b", line)
        if found:
            return found.group(1)
    raise AssertionError(f"no admin key printed; stdout so far: {seen!r}")


@pytest.mark.slow
def test_first_start_and_documented_walkthrough(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["PYTHONPATH"] = str(REPO)
    env["LORAPLEX_LOG_FORMAT"] = "json"
    log_path = tmp_path / "server.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
    )
    try:
        admin_key = _wait_for_admin_key(proc, time.monotonic() + 90)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not answer /health"
            time.sleep(0.2)

        # The embedded defaults: everything under ./data of the working folder.
        data = tmp_path / "data"
        assert (data / "loraplex.db").exists()
        assert (data / "secret").exists()
        assert admin_key not in (data / "secret").read_text()

        first, more = _walkthrough_scripts()
        script = first.replace("BASE=http://127.0.0.1:8000", f"BASE={base}")
        script = re.sub(r"^ADMIN_KEY=lpx_\.\.\..*$", f"ADMIN_KEY={admin_key}", script, flags=re.M)
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script + "\necho ---\n" + more],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        out, later = (part.strip().splitlines() for part in run.stdout.split("---\n", 1))
        assert out[-1] == "403", out
        assert re.match(r"tenant: [0-9a-f-]{36}$", out[0]), out
        assert re.match(r"tenant key: lpx_[0-9A-Za-z]{43}$", out[1]), out
        assert '"name":"acme"' in out[2]
        # The second block: suspend, refused, resume, filter, billing key, list, revoke.
        assert '"status":"suspended"' in later[0] and '"requests_per_minute":null' in later[0]
        assert '"code":"tenant_suspended"' in later[1]
        assert '"status":"active"' in later[2]
        assert '"data":[]' in later[3]
        assert '"name":"finance"' in later[4] and '"name":"production"' in later[4]
        assert out[1].removeprefix("tenant key: ") not in later[4]  # prefixes only, never the keys
        assert later[-1] == "204", later
        tenant_key = out[1].removeprefix("tenant key: ")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
    # The server's log: one JSON object a line, with request ids, and never a key.
    log_text = log_path.read_text()
    assert admin_key not in log_text and tenant_key not in log_text
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "loraplex.access"]
    assert len(access) >= 10 and all(line["request_id"] for line in access)
