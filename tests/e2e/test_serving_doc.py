"""docs/serving.md, run as written: every ```bash and ```python block in order, in a fresh folder, against
`loraplex serve` on the embedded defaults (SQLite, in-process limiter, local object store, demo model).
Only port 8000 is swapped for a free one. ```sh blocks are shown but not run (the long load test)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "serving.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def shell_env(state: Path) -> dict[str, str]:
    """The environment the doc's blocks built up (their `export`s), for a python block."""
    out = subprocess.run(
        ["bash", "-c", f"source {state} && env -0"],
        capture_output=True,
        check=True,
        env=base_env(state.parent),
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def base_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(cwd)
    return env


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    port = str(free_port())
    blocks = [(lang, code.replace("8000", port)) for lang, code in BLOCK.findall(DOC.read_text())]
    assert [lang for lang, _ in blocks].count("python") >= 2 and any("loraplex serve" in c for _, c in blocks)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    state = tmp_path / "state.sh"
    state.write_text("")
    server: subprocess.Popen[bytes] | None = None
    outputs: list[str] = []
    try:
        for lang, code in blocks:
            if "loraplex serve" in code:
                server = subprocess.Popen(
                    ["bash", "-c", f"source {state}\n{code}"],
                    cwd=tmp_path,
                    env=base_env(tmp_path),
                    stdout=(tmp_path / "server.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                continue
            if lang == "bash":
                script = f"set -eo pipefail\nsource {state}\n{code}\nexport -p > {state}\n"
                cmd, env = ["bash", "-c", script], base_env(tmp_path)
            else:
                cmd, env = ["python", "-c", code], shell_env(state)
            done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
            log = (tmp_path / "server.log").read_text() if server else ""
            assert done.returncode == 0, (
                f"block failed:\n{code}\n{done.stdout}\n{done.stderr}\nserver:\n{log[-3000:]}"
            )
            outputs.append(done.stdout)
        text = "\n".join(outputs)
        assert "support-bot@1" in text and "CompletionUsage(" in text and '"status":"ready"' in text
        # Every completion the walkthrough made is billed: two in step 4, one streamed, three in step 7.
        env = shell_env(state)
        report = json.loads(
            subprocess.run(
                [
                    "curl",
                    "-s",
                    f"{env['LORAPLEX_URL']}/admin/usage?group_by=tenant",
                    "-H",
                    f"Authorization: Bearer {env['LORAPLEX_ADMIN_KEY']}",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert report["totals"]["requests"] == 6, report
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
