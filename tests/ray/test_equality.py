"""Outputs through the Ray engine tier (2 replicas) equal the single-process server's, token for token,
for base-model and adapter requests, streamed and not; /ready counts the live replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ray.conftest import REPLICAS, ray_settings, sse_events, start_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["hello world", "def add(a, b):"]


@pytest.fixture(scope="module")
def local_server(
    ray_server: Any,
    demo_model: Path,
    module_database: str,
    module_s3: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """The in-process server on the same database, object store and secret as the Ray one."""
    settings = {**ray_settings(module_s3), "ray": False}
    server = start_server(demo_model, tmp_path_factory.mktemp("local-data"), module_database, **settings)
    try:
        yield server
    finally:
        server.stop()


def complete(url: str, key: str, model: str, prompt: str, stream: bool) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        if not stream:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            return {"text": data["choices"][0]["text"], "usage": data["usage"]}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            events = sse_events(r.iter_lines())
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return {"text": text, "usage": next(e["usage"] for e in events if e.get("usage"))}


def test_ray_tier_equals_the_in_process_server(ray_server: Any, local_server: Any) -> None:
    tenant = ray_server.tenant()
    key = ray_server.key(tenant["id"])
    ray_server.upload(tenant["id"], "attn", ray_server.demo_model / "adapters" / "demo-attn")
    base = httpx.get(
        ray_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()["data"][0]["id"]
    compared = 0
    for model in (base, "attn"):
        for prompt in PROMPTS:
            for stream in (False, True):
                got = complete(ray_server.url, key, model, prompt, stream)
                want = complete(local_server.url, key, model, prompt, stream)
                assert got["text"] == want["text"], (model, prompt, stream)
                assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] == 12
                assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
                compared += 1
    assert compared == 8
    # The adapter changes the output (so the equality above covers the adapter path for real).
    assert (
        complete(ray_server.url, key, base, PROMPTS[0], False)["text"]
        != complete(ray_server.url, key, "attn", PROMPTS[0], False)["text"]
    )


def test_ready_reports_live_engine_replicas(ray_server: Any, local_server: Any) -> None:
    ready = ray_server.admin.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["engine_replicas"] == REPLICAS
    # The in-process engine has no replicas to count: the field is absent.
    assert "engine_replicas" not in local_server.admin.get("/ready").json()


def test_structured_outputs_through_the_ray_tier(ray_server: Any, local_server: Any) -> None:
    """A constrained request answers the same through the replicas as in-process, and a schema that does
    not compile is the same 400 (checked on a replica before any limit or usage row)."""
    tenant = ray_server.tenant()
    key = ray_server.key(tenant["id"])
    headers = {"Authorization": f"Bearer {key}"}
    model = httpx.get(ray_server.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "pick one:", "max_tokens": 8, "temperature": 0.0,
            "guided_choice": ["alpha", "beta", "gamma"]}  # fmt: skip
    answers = []
    for url in (ray_server.url, local_server.url):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["text"])
    assert answers[0] == answers[1] and answers[0] in {"alpha", "beta", "gamma"}
    bad = {**body, "guided_choice": None, "guided_regex": "(unclosed"}
    codes = []
    for url in (ray_server.url, local_server.url):
        r = httpx.post(url + "/v1/completions", json=bad, headers=headers, timeout=60)
        codes.append((r.status_code, r.json()["error"]["code"]))
    assert codes[0] == codes[1] == (400, "invalid_schema")
