"""The completion fields against a live server (demo model on CPU, real PostgreSQL, Redis and S3) with the
`openai` SDK and httpx: echo, max_tokens 0, lists of prompts, prompt_logprobs, continuous usage stats, and
the bill equal to what clients were told."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import LiveServer

# The e2e suite's live server (one per module), reused here.
demo_model, module_database, module_s3, live_server = (
    e2e.demo_model,
    e2e.module_database,
    e2e.module_s3,
    e2e.live_server,
)

pytestmark = pytest.mark.slow
PROMPT = "Language models predict"
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 5, "ignore_eos": True}


@pytest.fixture(scope="module")
def key(live_server: LiveServer) -> str:
    t = live_server.tenant()
    live_server.upload(t["id"], "attn", live_server.demo_model / "adapters" / "demo-attn")
    return live_server.key(t["id"])


@pytest.fixture(scope="module")
def client(live_server: LiveServer, key: str) -> Any:
    return live_server.openai(key)


@pytest.fixture(scope="module")
def http(live_server: LiveServer, key: str) -> Any:
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        yield c


def _complete(client: Any, prompt: Any, **kw: Any) -> Any:
    return client.completions.create(
        model="demo-model",
        prompt=prompt,
        extra_body={"ignore_eos": True},
        **{"temperature": 0.0, "max_tokens": 5, **kw},
    )


def _row(live_server: LiveServer, request_id: str) -> dict[str, Any]:
    rows = [r for r in live_server.usage_rows() if r["request_id"] == request_id]
    assert len(rows) == 1, rows
    return rows[0]


def _billed_as_told(live_server: LiveServer, request_id: str, usage: Any) -> None:
    row = _row(live_server, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_echo_prepends_the_prompt_and_bills_the_same(live_server: LiveServer, client: Any) -> None:
    plain = _complete(client, PROMPT)
    echoed = _complete(client, PROMPT, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage == plain.usage
    _billed_as_told(live_server, echoed.id, echoed.usage)


def test_echo_with_max_tokens_0_is_the_prompt_alone(live_server: LiveServer, client: Any) -> None:
    out = _complete(client, PROMPT, echo=True, max_tokens=0)
    assert out.choices[0].text == PROMPT and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens > 0
    _billed_as_told(live_server, out.id, out.usage)
    with pytest.raises(Exception) as err:
        _complete(client, PROMPT, max_tokens=0)
    assert err.value.status_code == 400 and err.value.body["param"] == "max_tokens"  # type: ignore[attr-defined]


def test_echo_with_logprobs_covers_the_prompt_tokens(client: Any, http: Any) -> None:
    out = _complete(client, PROMPT, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    prompt_tokens = out.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + 5 and PROMPT in "".join(lp.tokens[:prompt_tokens])
    assert lp.text_offset[prompt_tokens] == len(PROMPT)  # the first generated token, after the echo
    assert lp.text_offset == sorted(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    # The prompt part equals vLLM's prompt_logprobs for the same prompt.
    body = {"model": "demo-model", "prompt": PROMPT, "max_tokens": 0, "prompt_logprobs": 2}
    got = http.post("/v1/completions", json=body).json()["choices"][0]
    assert got["text"] == "" and len(got["prompt_logprobs"]) == prompt_tokens
    for position in range(1, prompt_tokens):
        entries = got["prompt_logprobs"][position]
        mine = [e for e in entries.values() if e["decoded_token"] == lp.tokens[position]]
        assert mine and mine[0]["logprob"] == pytest.approx(lp.token_logprobs[position], abs=1e-5)
        assert sorted(e["rank"] for e in entries.values())[:2] == [1, 2]


def test_prompt_logprobs_with_an_adapter_differ_from_the_base(http: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0}
    base = http.post("/v1/completions", json={**body, "model": "demo-model"}).json()["choices"][0]
    lora = http.post("/v1/completions", json={**body, "model": "attn"}).json()["choices"][0]
    assert base["prompt_logprobs"][0] is None and len(base["prompt_logprobs"]) == len(lora["prompt_logprobs"])
    first = [next(iter(e.values()))["logprob"] for e in base["prompt_logprobs"][1:]]
    other = [next(iter(e.values()))["logprob"] for e in lora["prompt_logprobs"][1:]]
    assert first != other  # the adapter changes the model, so its prompt logprobs
    bad = http.post("/v1/completions", json={**body, "model": "demo-model", "prompt_logprobs": 21})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"


def test_a_list_of_prompts_gives_n_choices_each_and_one_usage_row(
    live_server: LiveServer, client: Any
) -> None:
    prompts = [PROMPT, "Hello there", [5, 6, 7, 8]]
    singles = [_complete(client, p) for p in prompts]
    out = _complete(client, prompts, n=2)
    assert [c.index for c in out.choices] == list(range(6))
    for p, single in enumerate(singles):
        assert [out.choices[2 * p + i].text for i in range(2)] == [single.choices[0].text] * 2
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert out.usage.completion_tokens == 6 * 5
    _billed_as_told(live_server, out.id, out.usage)


def test_a_list_of_prompts_streams_with_the_right_indices(live_server: LiveServer, client: Any) -> None:
    prompts = ["one", "two two", "three three three"]
    whole = _complete(client, prompts, n=2, echo=True)
    texts: dict[int, str] = {}
    usage = None
    rid = None
    for chunk in _complete(
        client, prompts, n=2, echo=True, stream=True, stream_options={"include_usage": True}
    ):
        rid = chunk.id
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in whole.choices}
    assert all(texts[2 * p + i].startswith(prompts[p]) for p in range(3) for i in range(2))
    assert usage == whole.usage
    _billed_as_told(live_server, rid, usage)


def test_prompt_lists_are_bounded(http: Any) -> None:
    r = http.post("/v1/completions", json={"model": "demo-model", "prompt": ["a"] * 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/completions", json={"model": "demo-model", "prompt": ["a", [999999]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"


def test_continuous_usage_stats_on_every_chunk(live_server: LiveServer, http: Any) -> None:
    body = {
        "model": "demo-model",
        "prompt": PROMPT,
        **GREEDY,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = []
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert all(c["usage"] is not None for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert done == sorted(done) and done[-1] == 10 and done[0] < 10
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {chunks[-1]["usage"]["prompt_tokens"]}
    row = _row(live_server, chunks[-1]["id"])
    assert row["completion_tokens"] == 10
    # Without include_usage the option changes nothing (vLLM's rule).
    body["stream_options"] = {"continuous_usage_stats": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert all(c["usage"] is None for c in lines)


def test_tokenize_and_detokenize(live_server: LiveServer, client: Any, http: Any) -> None:
    rows_before = len(live_server.usage_rows())
    told = _complete(client, PROMPT).usage.prompt_tokens
    r = http.post("/tokenize", json={"model": "attn", "prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == told  # counted as completions count the prompt
    assert body["max_model_len"] == 512
    bare = http.post("/tokenize", json={"model": "demo-model", "prompt": PROMPT, "add_special_tokens": False})
    assert bare.json()["tokens"] == body["tokens"][1:]  # without the BOS token
    back = http.post("/detokenize", json={"model": "demo-model", "tokens": bare.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    chat = [{"role": "user", "content": "Hello"}]
    chat_count = client.chat.completions.create(
        model="demo-model", messages=chat, max_tokens=1
    ).usage.prompt_tokens
    assert (
        http.post("/tokenize", json={"model": "demo-model", "messages": chat}).json()["count"] == chat_count
    )
    # Not billed: only the two completions above wrote usage rows.
    assert len(live_server.usage_rows()) == rows_before + 2


def test_tokenize_is_tenant_scoped_and_bounded(live_server: LiveServer, http: Any) -> None:
    other = live_server.tenant()
    stranger = {"Authorization": f"Bearer {live_server.key(other['id'])}"}
    r = httpx.post(live_server.url + "/tokenize", json={"model": "attn", "prompt": "x"}, headers=stranger)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (
        httpx.post(live_server.url + "/tokenize", json={"model": "demo-model", "prompt": "x"}).status_code
        == 401
    )
    cases = [
        ("/tokenize", {"model": "demo-model"}, "prompt"),
        ("/tokenize", {"model": "demo-model", "prompt": "x", "messages": [{"role": "user"}]}, "prompt"),
        ("/tokenize", {"model": "demo-model", "prompt": 5}, "prompt"),
        ("/detokenize", {"model": "demo-model", "tokens": [10**9]}, "tokens"),
        ("/detokenize", {"model": "demo-model", "tokens": ["1"]}, "tokens[0]"),
        ("/detokenize", {"model": "demo-model", "tokens": [1] * 131_073}, "tokens"),
    ]
    for path, body, param in cases:
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_tokenize_counts_against_the_request_limit(live_server: LiveServer) -> None:
    t = live_server.tenant(requests_per_minute=2)
    headers = {"Authorization": f"Bearer {live_server.key(t['id'])}"}
    codes = [
        httpx.post(
            live_server.url + "/tokenize", json={"model": "demo-model", "prompt": "x"}, headers=headers
        ).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]


def test_streamed_echo_of_the_prompt_alone(live_server: LiveServer, client: Any) -> None:
    prompts = ["first prompt", "second"]
    chunks = list(
        _complete(
            client, prompts, echo=True, max_tokens=0, stream=True, stream_options={"include_usage": True}
        )
    )
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: prompts[0], 1: prompts[1]}
    finals = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finals == ["length", "length"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == 0
    _billed_as_told(live_server, chunks[-1].id, usage)


def test_prompt_logprobs_of_a_list_belong_to_each_prompt(http: Any) -> None:
    prompts = ["one two three", "four five"]
    body = {"model": "demo-model", "max_tokens": 1, "prompt_logprobs": 1, "n": 2}
    whole = http.post("/v1/completions", json={**body, "prompt": prompts}).json()["choices"]
    for p, prompt in enumerate(prompts):
        alone = http.post("/v1/completions", json={**body, "prompt": prompt}).json()["choices"][0]
        assert whole[2 * p]["prompt_logprobs"] == whole[2 * p + 1]["prompt_logprobs"]
        got = whole[2 * p]["prompt_logprobs"]
        assert len(got) == len(alone["prompt_logprobs"])
        for mine, theirs in zip(got[1:], alone["prompt_logprobs"][1:], strict=True):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert mine[k]["logprob"] == pytest.approx(theirs[k]["logprob"], abs=1e-5)


def test_streamed_prompt_logprobs_and_echoed_logprobs_equal_the_whole_answer(http: Any) -> None:
    body = {"model": "attn", "prompt": PROMPT, **GREEDY, "echo": True, "logprobs": 1, "prompt_logprobs": 2}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert chunks[0]["prompt_logprobs"] == whole["prompt_logprobs"]
    assert all(c["prompt_logprobs"] is None for c in chunks[1:])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    streamed = [v for c in chunks for v in c["logprobs"]["token_logprobs"]]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)
