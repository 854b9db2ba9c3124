"""Every curl call of docs/metering.md, run as written (keys and ids substituted) against the app."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from app.domain.usage.lifespan import metrics_of

DOC = Path(__file__).resolve().parents[3] / "docs" / "metering.md"


def curl_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


def run(client: Any, command: str, env: dict[str, str]) -> tuple[Any, str | None]:
    for name, value in env.items():
        command = command.replace(f"${name}", value)
    curl, _, pipe = command.partition(" | ")
    args = shlex.split(curl)[1:]
    method, url, headers, body = "GET", "", {}, None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-X":
            method, i = args[i + 1], i + 2
        elif arg == "-H":
            key, _, value = args[i + 1].partition(":")
            headers[key.strip()] = value.strip()
            i += 2
        elif arg == "-d":
            body, i = args[i + 1], i + 2
        elif arg == "-o":
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            url, i = arg, i + 1
    path = url.removeprefix("http://127.0.0.1:8000")
    return client.request(method, path, headers=headers, content=body), pipe or None


def test_every_documented_call_works(client, admin_headers, make_tenant, make_key) -> None:  # type: ignore[no-untyped-def]
    tenant = make_tenant(name="docs-tenant")
    env = {
        "TENANT_ID": tenant["id"],
        "ADMIN_KEY": admin_headers["Authorization"].removeprefix("Bearer "),
        "BILLING_KEY": make_key(tenant["id"], scopes=("billing",)),
        "TENANT_KEY": make_key(tenant["id"]),
    }
    metrics_of(client.app).bind_engine(lambda: {"num_running": 0, "num_waiting": 0}, "demo")
    commands = curl_commands()
    assert len(commands) == 5
    for command in commands:
        response, pipe = run(client, command, env)
        assert response.status_code == 200, (command, response.text)
        if pipe is not None:
            pattern = shlex.split(pipe)[-1]
            assert any(re.search(pattern, line) for line in response.text.splitlines()), command
    limits = client.get(f"/admin/tenants/{tenant['id']}", headers=admin_headers).json()
    assert limits["requests_per_minute"] == 60 and limits["monthly_token_quota"] == 5000000
