"""Locust users for loraplex: tenants calling completions, an admin uploading adapters, billing reading usage.

The tenants, keys and adapters come from a setup file written by `loadtests/run.py` (path in
`LORAPLEX_LOADTEST_SETUP`), so this file never needs the admin key for anything but uploads.
TTFT and tokens/s are reported as extra Locust entries of type METRIC (response_time = the value:
milliseconds for TTFT, tokens per second for throughput), so they appear in the stats table and CSVs.

Run through the runner (it sets everything up and checks the bill afterwards):
    python -m loadtests.run --host http://127.0.0.1:8000 --admin-key "$LORAPLEX_ADMIN_KEY" --run-time 60
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

SETUP: dict[str, Any] = {}
_next_tenant = itertools.count()

QUESTIONS = [
    "What is a LoRA adapter?",
    "Summarise paged attention in one line.",
    "Name three prime numbers.",
    "Why batch many adapters together?",
    "Write a haiku about GPUs.",
]


def load_setup() -> dict[str, Any]:
    if not SETUP:
        SETUP.update(json.loads(Path(os.environ["LORAPLEX_LOADTEST_SETUP"]).read_text()))
    return SETUP


COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
COUNTS = {"ok": 0, "failed": 0}


@events.request.add_listener
def count_completions(request_type: str, name: str, exception: Any, **_: Any) -> None:
    """Completions as the client saw them; the runner compares this with the bill."""
    if request_type == "POST" and name.split(" ")[0] in COMPLETION_PATHS:
        COUNTS["failed" if exception else "ok"] += 1


@events.quitting.add_listener
def write_counts(**_: Any) -> None:
    path = os.environ.get("LORAPLEX_LOADTEST_COUNTS")
    if path:
        Path(path).write_text(json.dumps(COUNTS))


def metric(name: str, value: float) -> None:
    events.request.fire(
        request_type="METRIC", name=name, response_time=value, response_length=0, exception=None, context={}
    )


class TenantUser(HttpUser):
    """One customer program: its own key, its adapters and the base model, one shared system prompt."""

    weight = 8
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        tenants = load_setup()["tenants"]
        self.tenant = tenants[next(_next_tenant) % len(tenants)]
        self.headers = {"Authorization": f"Bearer {self.tenant['key']}"}

    def model(self) -> str:
        return random.choice([load_setup()["base_model"], *self.tenant["adapters"]])

    def chat_body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model(),
            "messages": [
                {"role": "system", "content": self.tenant["system_prompt"]},
                {"role": "user", "content": random.choice(QUESTIONS)},
            ],
            "max_tokens": load_setup().get("max_tokens", 8),
            "temperature": 0.7,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    @task(3)
    def chat(self) -> None:
        with self.client.post(
            "/v1/chat/completions",
            json=self.chat_body(False),
            headers=self.headers,
            name="/v1/chat/completions",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            usage = resp.json().get("usage") or {}
            if not usage.get("completion_tokens"):
                resp.failure(f"no usage in {resp.text[:200]}")
                return
            metric("tokens_per_s", usage["completion_tokens"] / max(resp.elapsed.total_seconds(), 1e-6))
            resp.success()

    @task(3)
    def chat_stream(self) -> None:
        self._stream("/v1/chat/completions", self.chat_body(True), "/v1/chat/completions [stream]")

    @task(2)
    def completion_stream(self) -> None:
        body = {
            "model": self.model(),
            "prompt": self.tenant["system_prompt"] + " " + random.choice(QUESTIONS),
            "max_tokens": load_setup().get("max_tokens", 8),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self._stream("/v1/completions", body, "/v1/completions [stream]")

    @task(1)
    def own_usage(self) -> None:
        self.client.get("/v1/usage", headers=self.headers, name="/v1/usage")

    def _stream(self, path: str, body: dict[str, Any], name: str) -> None:
        started = time.perf_counter()
        first: float | None = None
        usage: dict[str, Any] | None = None
        done = False
        with self.client.post(
            path, json=body, headers=self.headers, name=name, stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            for raw in resp.iter_lines():
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    resp.failure(f"stream error: {chunk['error']}")
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk.get("choices"):
                    first = time.perf_counter()
            elapsed = time.perf_counter() - started
            if not done or usage is None or first is None:
                resp.failure(f"incomplete stream (done={done}, usage={usage is not None})")
                return
            resp.success()
        metric("ttft_ms", (first - started) * 1000)
        metric("tokens_per_s", usage["completion_tokens"] / max(elapsed - (first - started), 1e-6))


class AdminUser(HttpUser):
    """An operator uploading a new adapter version now and then, and listing what is there."""

    weight = 1
    wait_time = between(2, 4)

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {load_setup()['admin_key']}"}

    @task
    def upload(self) -> None:
        setup = load_setup()
        tenant = random.choice(setup["tenants"])
        folder = Path(setup["upload_adapter_dir"])
        files = {
            "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
        }
        url = f"/admin/tenants/{tenant['tenant_id']}/adapters"
        name = "/admin/tenants/{id}/adapters"
        self.client.post(url, data={"name": "uploaded"}, files=files, headers=self.headers, name=name)
        self.client.get(url, headers=self.headers, name=name + " [list]")


class BillingUser(HttpUser):
    """Finance reading the bill, as JSON and as CSV."""

    weight = 1
    wait_time = between(1, 2)

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {load_setup()['admin_key']}"}

    @task
    def usage(self) -> None:
        group_by = random.choice(["tenant", "day", "adapter"])
        self.client.get(f"/admin/usage?group_by={group_by}", headers=self.headers, name="/admin/usage")
        self.client.get(
            "/admin/usage?group_by=tenant",
            headers={**self.headers, "Accept": "text/csv"},
            name="/admin/usage [csv]",
        )
