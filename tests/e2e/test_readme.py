"""README.md, run as written: `loraplex serve` on the embedded defaults in an empty folder, then the
walk-through's bash and python blocks (only port 8000 and the two `lpx_...` placeholders filled in),
then the offline engine example."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port
from tests.integration.foundation.test_walkthrough import _wait_for_admin_key

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def _section(title: str) -> str:
    return README.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(bash|python)\n(.*?)^```", section, re.S | re.M)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["PYTHONPATH"] = str(REPO)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = _blocks(_section("Walk-through: tenant, key, adapter, completion, bill"))
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash"], "README lost its walk-through"
    port = str(free_port())
    env = _env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", port],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "server.log").open("w"),
        text=True,
        start_new_session=True,
    )
    try:
        admin_key = _wait_for_admin_key(proc, time.monotonic() + 120)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # /ready: database reachable and the demo model loaded
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.3)

        def fill(code: str) -> str:
            return code.replace("8000", port).replace("ADMIN_KEY=lpx_...", f"ADMIN_KEY={admin_key}")

        (_, setup), (_, sdk), (_, bill) = blocks
        first = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", fill(setup) + '\necho "TENANT_KEY=$TENANT_KEY"'],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr + first.stdout
        lines = first.stdout.strip().splitlines()
        tenant_key = lines[-1].removeprefix("TENANT_KEY=")
        assert re.fullmatch(r"lpx_[0-9A-Za-z]{43}", tenant_key)
        assert '"name":"acme"' in lines[0] and lines[1] == "403"
        upload = json.loads(lines[2])
        assert upload["name"] == "support-bot" and upload["status"] == "ready" and upload["version"] == 1

        second = subprocess.run(
            [sys.executable, "-c", fill(sdk).replace('api_key="lpx_..."', f'api_key="{tenant_key}"')],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr + second.stdout
        assert "CompletionUsage(" in second.stdout and "[DONE]" not in second.stdout

        script = f"BASE={base}\nADMIN_KEY={admin_key}\nTENANT_KEY={tenant_key}\n{fill(bill)}"
        third = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert third.returncode == 0, third.stderr + third.stdout
        own, csv = third.stdout.split("\n", 1)
        assert json.loads(own)["totals"]["requests"] == 2  # the chat reply and the streamed completion
        header, *days = csv.strip().splitlines()
        assert "day" in header.split(",") and len(days) == 1 and ",acme," in days[0], csv
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_readme_engine_example_runs_as_written(tmp_path: Path) -> None:
    ((lang, code),) = _blocks(_section("The engine, offline"))
    assert lang == "python"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout.strip().splitlines()
    assert len(out) == 2 and all(
        re.match(r"\[\d+(, \d+)*\] '.*' (length|stop) \d+$", line) for line in out
    ), out
