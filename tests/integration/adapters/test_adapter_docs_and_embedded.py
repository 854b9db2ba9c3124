"""docs/adapters.md's curl commands against a live server, and the embedded default (SQLite + local folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import TEST_ADMIN_KEY, free_port

DOC = Path(__file__).resolve().parents[3] / "docs" / "adapters.md"


def _bash_blocks(section_title: str) -> list[str]:
    section = DOC.read_text().split(f"## {section_title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


class LiveServer:
    def __init__(self, app) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _run(script: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_documented_curl_commands_work(app, make_adapter, tmp_path):
    shutil.copytree(make_adapter(r=8), tmp_path / "support-bot")
    upload_block = _bash_blocks("Upload")[0]
    list_block = _bash_blocks("List, get, delete")[0]
    with LiveServer(app) as live:
        headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
        tenant = httpx.post(f"{live.url}/admin/tenants", json={"name": "docs"}, headers=headers).json()
        env = {**os.environ, "LPX": live.url, "ADMIN_KEY": TEST_ADMIN_KEY, "TENANT_ID": tenant["id"]}
        # The block sets LPX/ADMIN_KEY/TENANT_ID to placeholders: keep the live values instead.
        script = "\n".join(line for line in upload_block.splitlines() if not line.startswith("export "))
        created = json.loads(_run(script, tmp_path, env))
        assert created["name"] == "support-bot" and created["version"] == 1 and created["rank"] == 8
        again = json.loads(_run(script, tmp_path, env))  # same Idempotency-Key: the same adapter
        assert again["id"] == created["id"]

        files = {
            "adapter_config": (
                "adapter_config.json",
                (tmp_path / "support-bot/adapter_config.json").read_bytes(),
            ),
            "weights": (
                "adapter_model.safetensors",
                (tmp_path / "support-bot/adapter_model.safetensors").read_bytes(),
            ),
        }
        url = f"{live.url}/admin/tenants/{tenant['id']}/adapters"
        v2 = httpx.post(url, data={"name": "support-bot"}, files=files, headers=headers).json()
        assert v2["version"] == 2

        env["ADAPTER_ID"] = created["id"]
        commands = [line for line in list_block.splitlines() if line.startswith("curl ")]
        outputs = [_run(command, tmp_path, env) for command in commands]
        listed, current, first, by_id, delete_one, delete_name = outputs
        assert json.loads(listed)["total"] == 2
        assert json.loads(current)["id"] == v2["id"]
        assert json.loads(first)["id"] == json.loads(by_id)["id"] == created["id"]
        assert delete_one == delete_name == ""  # 204s
        assert httpx.get(url, headers=headers).json()["total"] == 0


def test_embedded_default_sqlite_and_local_folder(build_app, base_dir, make_adapter, tmp_path):
    from litestar.testing import TestClient

    from app.db.migrate import upgrade

    data = tmp_path / "data"
    (data / "demo-model").mkdir(parents=True)
    shutil.copy(base_dir / "config.json", data / "demo-model" / "config.json")
    url = f"sqlite+aiosqlite:///{data / 'loraplex.db'}"
    upgrade(url, "head")
    app = build_app(database_url=url)
    folder = make_adapter(r=4)
    headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
    with TestClient(app) as client:
        tenant = client.post("/admin/tenants", json={"name": "laptop"}, headers=headers).json()
        files = {
            "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
        }
        base = f"/admin/tenants/{tenant['id']}/adapters"
        first = client.post(base, data={"name": "bot"}, files=files, headers=headers)
        second = client.post(base, data={"name": "bot"}, files=files, headers=headers)
        assert (first.status_code, second.status_code) == (201, 201), first.text
        assert second.json()["version"] == 2
        stored = (
            data / "objects" / "adapters" / tenant["id"] / first.json()["id"] / "adapter_model.safetensors"
        )
        assert stored.read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
        assert client.delete(f"{base}/bot", headers=headers).status_code == 204
        assert not (data / "objects" / "adapters").exists() or not any(
            (data / "objects" / "adapters").rglob("*.safetensors")
        )
