"""The official `openai` SDK against a real server: completions and chat, streaming and not, base and
adapters, outputs equal to the engine's offline `LLM` on the same inputs, and the bill equal to what
clients were told."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import TEST_ADMIN_KEY, LiveServer, error_of

PROMPT = "Language models predict the next token"
MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello, world! How are you today?"},
]


@pytest.fixture(scope="module")
def offline(demo_model: Path) -> Any:
    from engine import LLM

    return LLM(model=str(demo_model), device="cpu", dtype="float32", max_model_len=512)


@pytest.fixture(scope="module")
def tenant_a(live_server: LiveServer) -> dict[str, Any]:
    t = live_server.tenant()
    adapters = live_server.demo_model / "adapters"
    live_server.upload(t["id"], "attn", adapters / "demo-attn")
    live_server.upload(t["id"], "mlp", adapters / "demo-mlp")
    return {**t, "key": live_server.key(t["id"]), "client": live_server.openai(live_server.key(t["id"]))}


@pytest.fixture(scope="module")
def tenant_b(live_server: LiveServer) -> dict[str, Any]:
    t = live_server.tenant()
    key = live_server.key(t["id"])
    return {**t, "key": key, "client": live_server.openai(key)}


def offline_text(offline: Any, prompt: Any, max_tokens: int, adapter: Path | None = None, **kw: Any) -> Any:
    from engine import LoRARequest, SamplingParams

    lora = LoRARequest(adapter.name, str(adapter)) if adapter is not None else None
    out = offline.generate(
        [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), lora_request=lora
    )
    return out[0].outputs[0]


def test_models_lists_the_base_model_and_only_own_adapters(
    live_server: LiveServer, tenant_a: dict[str, Any], tenant_b: dict[str, Any]
) -> None:
    a_ids = {m.id: m for m in tenant_a["client"].models.list().data}
    assert {"demo-model", "attn", "attn@1", "mlp", "mlp@1"} <= set(a_ids)
    assert a_ids["attn"].model_extra["parent"] == "demo-model"
    assert a_ids["demo-model"].model_extra["parent"] is None
    assert [m.id for m in tenant_b["client"].models.list().data] == ["demo-model"]
    assert tenant_a["client"].models.retrieve("attn@1").model_extra["parent"] == "demo-model"
    assert tenant_b["client"].models.retrieve("demo-model").id == "demo-model"
    with pytest.raises(openai.NotFoundError) as err:
        tenant_b["client"].models.retrieve("attn")
    assert error_of(err.value)["code"] == "model_not_found"


@pytest.mark.parametrize("adapter", [None, "attn", "mlp"])
def test_completion_equals_offline_llm(
    live_server: LiveServer, tenant_a: dict[str, Any], offline: Any, adapter: str | None
) -> None:
    client = tenant_a["client"]
    folder = {"attn": "demo-attn", "mlp": "demo-mlp"}
    path = live_server.demo_model / "adapters" / folder[adapter] if adapter else None
    want = offline_text(offline, PROMPT, 12, path, ignore_eos=True)
    got = client.completions.create(
        model=adapter or "demo-model",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids) == 12
    assert got.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=adapter or "demo-model",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_adapters_change_the_output(tenant_a: dict[str, Any]) -> None:
    # The positive control for the equality above: if adapters were ignored, all three would agree.
    texts = {
        model: tenant_a["client"]
        .completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for model in ("demo-model", "attn", "mlp")
    }
    assert len(set(texts.values())) == 3


def test_prompt_as_token_ids(tenant_a: dict[str, Any], offline: Any) -> None:
    ids = offline.get_tokenizer().encode(PROMPT)
    got = tenant_a["client"].completions.create(model="demo-model", prompt=ids, max_tokens=6, temperature=0)
    assert got.choices[0].text == offline_text(offline, ids, 6).text
    assert got.usage.prompt_tokens == len(ids)


def test_chat_uses_the_chat_template_and_equals_offline(
    live_server: LiveServer, tenant_a: dict[str, Any], offline: Any
) -> None:
    ids = offline.get_tokenizer().apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = offline_text(offline, ids, 10, live_server.demo_model / "adapters" / "demo-attn", ignore_eos=True)
    client = tenant_a["client"]
    got = client.chat.completions.create(
        model="attn", messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)
    chunks = list(
        client.chat.completions.create(
            model="attn",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10 and last.usage.prompt_tokens == len(ids)


def test_sse_wire_format_ends_with_done(live_server: LiveServer, tenant_a: dict[str, Any]) -> None:
    body = {"model": "demo-model", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        live_server.url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {tenant_a['key']}"},
        timeout=30,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_n_seed_stop_and_logprobs(tenant_a: dict[str, Any]) -> None:
    client = tenant_a["client"]
    kw: dict[str, Any] = {"model": "demo-model", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}
    one = client.completions.create(n=3, seed=7, logprobs=0, **kw)
    again = client.completions.create(n=3, seed=7, logprobs=0, **kw)
    assert sorted(c.index for c in one.choices) == [0, 1, 2]
    assert [c.text for c in one.choices] == [c.text for c in again.choices]
    # Usage counts every choice's tokens.
    assert one.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in one.choices)
    greedy = client.completions.create(
        model="demo-model",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = greedy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == greedy.choices[0].text
    assert all(
        len(top) <= 2 and max(top.values()) >= tok_lp - 1e-4
        for top, tok_lp in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    streamed = list(
        client.completions.create(
            model="demo-model",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    streamed_tokens = [
        t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed_tokens == lp.tokens
    stop = greedy.choices[0].text[3:5]
    if stop.strip("\ufffd"):
        cut = client.completions.create(
            model="demo-model", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop]
        )
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    chat = client.chat.completions.create(
        model="demo-model", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"cache_salt": "someone-elses"}}, "cache_salt"),
        ({"prompt": "word " * 2000}, "prompt"),
        ({"prompt": [999999]}, "prompt"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    live_server: LiveServer, tenant_a: dict[str, Any], kwargs: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": "demo-model", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    before = len(live_server.usage_rows())
    with pytest.raises(openai.BadRequestError) as err:
        tenant_a["client"].completions.create(**body)
    assert err.value.status_code == 400
    assert error_of(err.value)["param"] == param
    # Refused before the engine: no usage row, nothing reserved.
    assert len(live_server.usage_rows()) == before


def test_chat_context_overflow_names_messages(tenant_a: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        tenant_a["client"].chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "word " * 2000}], max_tokens=4
        )
    assert error_of(err.value)["param"] == "messages"
    assert error_of(err.value)["code"] == "context_length_exceeded"


def test_unknown_and_foreign_models_look_alike(tenant_a: dict[str, Any], tenant_b: dict[str, Any]) -> None:
    errors = []
    for model in ("attn", "attn@1", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as err:
            tenant_b["client"].completions.create(model=model, prompt=PROMPT, max_tokens=2)
        errors.append(error_of(err.value))
    for e, model in zip(errors, ("attn", "attn@1", "no-such-adapter"), strict=True):
        assert e["param"] == "model" and e["code"] == "model_not_found"
        assert e["message"] == f"The model '{model}' does not exist or you do not have access to it."
    with pytest.raises(openai.NotFoundError):
        tenant_a["client"].completions.create(model="attn@9", prompt=PROMPT, max_tokens=2)


def test_keys_without_the_completions_scope_are_refused(
    live_server: LiveServer, tenant_a: dict[str, Any]
) -> None:
    billing = live_server.openai(live_server.key(tenant_a["id"], scopes=("billing",)))
    with pytest.raises(openai.PermissionDeniedError):
        billing.completions.create(model="demo-model", prompt=PROMPT, max_tokens=2)
    admin = live_server.openai(TEST_ADMIN_KEY)
    with pytest.raises(openai.PermissionDeniedError):
        admin.completions.create(model="demo-model", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        live_server.openai("lpx_notakey").completions.create(model="demo-model", prompt=PROMPT, max_tokens=2)


def test_prefix_cache_is_per_tenant_with_a_positive_control(
    tenant_a: dict[str, Any], tenant_b: dict[str, Any]
) -> None:
    shared = "Once upon a time there was a little robot who wanted to learn how to write poems. " * 2
    first = tenant_a["client"].completions.create(
        model="demo-model", prompt=shared, max_tokens=2, temperature=0
    )
    repeat = tenant_a["client"].completions.create(
        model="demo-model", prompt=shared, max_tokens=2, temperature=0
    )
    other = tenant_b["client"].completions.create(
        model="demo-model", prompt=shared, max_tokens=2, temperature=0
    )
    assert first.usage.prompt_tokens == repeat.usage.prompt_tokens == other.usage.prompt_tokens >= 32
    assert repeat.usage.prompt_tokens_details.cached_tokens > 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    # Same tenant, another adapter: the adapter's content hash is part of every block's key.
    with_adapter = tenant_a["client"].completions.create(
        model="attn", prompt=shared, max_tokens=2, temperature=0
    )
    assert with_adapter.usage.prompt_tokens_details.cached_tokens == 0


def test_billing_equals_the_usage_returned_to_clients(live_server: LiveServer) -> None:
    t = live_server.tenant()
    key = live_server.key(t["id"])
    live_server.upload(t["id"], "attn", live_server.demo_model / "adapters" / "demo-attn")
    client = live_server.openai(key)
    told = []
    for i, model in enumerate(["demo-model", "attn", "attn", "demo-model"]):
        told.append(client.completions.create(model=model, prompt=f"{PROMPT} {i}", max_tokens=3 + i).usage)
    stream = client.chat.completions.create(
        model="attn", messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    told.append(next(c for c in stream if c.usage).usage)
    report = live_server.admin.get(
        "/admin/usage", params={"tenant_id": t["id"], "group_by": "adapter"}
    ).json()
    assert report["totals"]["requests"] == len(told)
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert report["totals"][field] == sum(getattr(u, field) for u in told)
    assert report["totals"]["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens for u in told)
    by_model = {r["model"]: r["requests"] for r in report["data"]}
    assert by_model == {"demo-model": 2, "attn": 3}
    # The tenant sees the same through its own key, and nobody else's.
    own = httpx.get(live_server.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert own["totals"]["requests"] == len(told)
    assert {r["tenant_id"] for r in own["data"]} == {t["id"]}


def fresh_adapter(live_server: LiveServer, tmp_path: Path, seed: int) -> Path:
    """An adapter whose content no other test uploaded (the caches are keyed by content, not by name)."""
    import json

    from engine.demo import write_adapter

    cfg = json.loads((live_server.demo_model / "config.json").read_text())
    return write_adapter(
        tmp_path / f"adapter-{seed}", cfg, r=4, lora_alpha=8, target_modules=["q_proj"], seed=seed
    )


def test_deleting_an_adapter_evicts_it_everywhere(live_server: LiveServer, tmp_path: Path) -> None:
    t = live_server.tenant()
    client = live_server.openai(live_server.key(t["id"]))
    adapter = live_server.upload(t["id"], "gone", fresh_adapter(live_server, tmp_path, 101))
    assert client.completions.create(model="gone", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    cache_dir = live_server.app.state.settings.data_dir / "adapter-cache" / adapter["sha256"]
    engine_cache = live_server.serving.engine._engine.engine.adapter_cache

    def resident() -> bool:
        return adapter["sha256"] in engine_cache._gpu or adapter["sha256"] in engine_cache._cpu

    assert cache_dir.is_dir() and resident()
    assert live_server.admin.delete(f"/admin/tenants/{t['id']}/adapters/gone").status_code in (200, 204)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gone", prompt=PROMPT, max_tokens=2)
    assert "gone" not in {m.id for m in client.models.list().data}
    # The adapter_deleted event reached the engine and the disk cache.
    deadline = time.monotonic() + 10
    while (cache_dir.exists() or resident()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cache_dir.exists() and not resident()


def test_an_adapter_whose_stored_bytes_changed_is_a_503_not_a_load(
    live_server: LiveServer, module_s3: dict[str, str], tmp_path: Path
) -> None:
    import boto3

    t = live_server.tenant()
    client = live_server.openai(live_server.key(t["id"]))
    adapter = live_server.upload(t["id"], "tampered", fresh_adapter(live_server, tmp_path, 102))
    s3 = boto3.client(
        "s3",
        endpoint_url=module_s3["endpoint_url"],
        region_name=module_s3["region"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key = f"adapters/{t['id']}/{adapter['id']}/adapter_model.safetensors"
    s3.put_object(Bucket=module_s3["bucket"], Key=key, Body=b"not the weights that were checked")
    rows_before = len(live_server.usage_rows())
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tampered", prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 503 and error_of(err.value)["code"] == "adapter_unavailable"
    assert len(live_server.usage_rows()) == rows_before


def test_metrics_count_requests_without_tenant_labels(
    live_server: LiveServer, tenant_a: dict[str, Any]
) -> None:
    tenant_a["client"].completions.create(model="demo-model", prompt=PROMPT, max_tokens=2)
    text = live_server.admin.get("/metrics").text
    count = next(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:e2e_request_latency_seconds_count")
    )
    assert count >= 1
    assert "vllm:time_to_first_token_seconds_bucket" in text
    assert tenant_a["id"] not in text and tenant_a["key"] not in text


def test_tenant_b_cannot_read_a_usage(
    live_server: LiveServer, tenant_a: dict[str, Any], tenant_b: dict[str, Any]
) -> None:
    tenant_a["client"].completions.create(model="demo-model", prompt=PROMPT, max_tokens=2)
    mine = httpx.get(
        live_server.url + "/v1/usage", headers={"Authorization": f"Bearer {tenant_b['key']}"}
    ).json()
    assert {r["tenant_id"] for r in mine["data"]} <= {tenant_b["id"]}
    a_rows = [r for r in live_server.usage_rows() if str(r["tenant_id"]) == tenant_a["id"]]
    assert a_rows and mine["totals"]["requests"] == sum(
        str(r["tenant_id"]) == tenant_b["id"] for r in live_server.usage_rows()
    )
    # Asking for A's tenant explicitly changes nothing for B's key.
    forced = httpx.get(
        live_server.url + "/v1/usage",
        params={"tenant_id": tenant_a["id"]},
        headers={"Authorization": f"Bearer {tenant_b['key']}"},
    )
    assert tenant_a["id"] not in forced.text


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", "invalid_json"),
        (b"", "invalid_json"),
        (b"[]", "invalid_json"),
        (b'{"model": 1, "prompt": "x"}', "invalid_type"),
    ],
)
def test_malformed_bodies_are_400_in_the_envelope(
    live_server: LiveServer, tenant_a: dict[str, Any], raw: bytes, code: str
) -> None:
    r = httpx.post(
        live_server.url + "/v1/completions",
        content=raw,
        headers={"Authorization": f"Bearer {tenant_a['key']}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert r.json()["error"]["param"] == ("model" if code == "invalid_type" else None)
