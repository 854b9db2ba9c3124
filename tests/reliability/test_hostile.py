"""Hostile input against a real server: nothing a client sends can stop the engine (issue 13).

Sixty-odd hostile bodies (every sampling number at 2**63, -1, 1e308 and as a string; huge stop lists;
JSON nested past any decoder's depth; NaN literals) are sent by a pool of threads while another tenant
streams a long completion. Each must be a 400 in OpenAI's envelope naming its field, the stream must
end with the text it has when run alone, and /ready must stay 200 throughout.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (  # noqa: F401 (fixtures this module's tests use)
    LiveServer,
    demo_model,
    live_server,
    module_database,
    module_s3,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

HUGE = 2**63
NUMERIC = [
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "best_of",
]
# -1 is a valid value of top_k (off), of the two OpenAI penalties and (as n's default) of nothing else here.
NEGATIVE_ONE_VALID = {"top_k", "presence_penalty", "frequency_penalty", "best_of"}
STREAM = {
    "model": "demo-model",
    "prompt": "Once upon a time",
    "max_tokens": 160,
    "temperature": 0,
    "ignore_eos": True,
}


def hostile_requests() -> list[tuple[str, str, bytes, str | None]]:
    """(label, path, raw body, the `param` the 400 must name; None where the body is not JSON at all)."""
    cases: list[tuple[str, str, dict[str, Any] | bytes, str | None]] = []
    for field in NUMERIC:
        for value in (HUGE, 1e308, "NaN"):
            cases.append((f"{field}={value!r}", "/v1/completions", {field: value}, field))
        if field not in NEGATIVE_ONE_VALID:
            cases.append((f"{field}=-1", "/v1/completions", {field: -1}, field))
    cases += [
        ("top_k=10**30", "/v1/completions", {"top_k": 10**30}, "top_k"),
        ("seed=2**64", "/v1/completions", {"seed": 2**64}, "seed"),
        ("temperature=true", "/v1/completions", {"temperature": True}, "temperature"),
        ("stop x1000", "/v1/completions", {"stop": ["x"] * 1000}, "stop"),
        ("stop 10k chars", "/v1/completions", {"stop": "y" * 10_000}, "stop"),
        ("stop_token_ids 2**63", "/v1/completions", {"stop_token_ids": [HUGE]}, "stop_token_ids"),
        ("stop_token_ids x1000", "/v1/completions", {"stop_token_ids": [1] * 1000}, "stop_token_ids"),
        ("stop_token_ids > vocab", "/v1/completions", {"stop_token_ids": [10**9]}, "stop_token_ids"),
        ("top_k > vocab", "/v1/completions", {"top_k": 10**9}, "top_k"),
        ("user 10k chars", "/v1/completions", {"user": "u" * 10_000}, "user"),
        ("logit_bias 1e308", "/v1/completions", {"logit_bias": {"1": 1e308}}, "logit_bias"),
        ("prompt token 2**63", "/v1/completions", {"prompt": [0, HUGE]}, "prompt"),
        ("prompt token -1", "/v1/completions", {"prompt": [0, -1]}, "prompt"),
        (
            "chat top_logprobs 2**63",
            "/v1/chat/completions",
            {"logprobs": True, "top_logprobs": HUGE},
            "top_logprobs",
        ),
        (
            "chat max_completion_tokens 2**63",
            "/v1/chat/completions",
            {"max_completion_tokens": HUGE},
            "max_completion_tokens",
        ),
        ("chat n 1e308", "/v1/chat/completions", {"n": 1e308}, "n"),
        ("chat seed -1", "/v1/chat/completions", {"seed": -1}, "seed"),
    ]
    deep = b"[" * 100_000 + b"]" * 100_000
    cases += [
        (
            "deep JSON in an unknown field",
            "/v1/completions",
            b'{"model": "demo-model", "prompt": "hi", "x": ' + deep + b"}",
            None,
        ),
        (
            "deep JSON in stop",
            "/v1/completions",
            b'{"model": "demo-model", "prompt": "hi", "stop": ' + deep + b"}",
            None,
        ),
        (
            "NaN literal",
            "/v1/completions",
            b'{"model": "demo-model", "prompt": "hi", "temperature": NaN}',
            None,
        ),
        (
            "Infinity literal",
            "/v1/completions",
            b'{"model": "demo-model", "prompt": "hi", "top_p": Infinity}',
            None,
        ),
    ]
    out = []
    for label, path, body, param in cases:
        if isinstance(body, dict):
            base = {"model": "demo-model"}
            base.update(
                {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
            )
            body = json.dumps({**base, **body}).encode()
        out.append((label, path, body, param))
    return out


def names(got: str | None, field: str | None) -> bool:
    """`param` names the field, or an element of it (msgspec says "prompt[1]")."""
    return got == field or (got is not None and field is not None and got.startswith(field + "["))


def stream_beside(
    server: LiveServer,
    headers: dict[str, str],
    others: Callable[[ThreadPoolExecutor], Iterable[Any]],
    workers: int,
) -> tuple[str, list[Any]]:
    """Stream STREAM; once its first chunk is in, run `others(pool)` beside it. Returns the stream's text
    and what `others` produced, listed once the stream and they are done."""
    text = ""
    started: Iterable[Any] | None = None
    with (
        httpx.stream(
            "POST",
            server.url + "/v1/completions",
            json={**STREAM, "stream": True},
            headers=headers,
            timeout=120,
        ) as stream,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"] if chunk["choices"] else ""
            if started is None:  # the stream is running: the others arrive now, interleaved with it
                started = others(pool)
        results = list(started or [])
    return text, [f.result() if isinstance(f, Future) else f for f in results]


def test_hostile_requests_are_400s_naming_their_field_while_a_stream_completes(
    live_server: LiveServer,  # noqa: F811 (the imported fixture)
) -> None:
    normal = {"Authorization": f"Bearer {live_server.key(live_server.tenant()['id'])}"}
    hostile = {
        "Authorization": f"Bearer {live_server.key(live_server.tenant()['id'])}",
        "Content-Type": "application/json",
    }
    alone = httpx.post(live_server.url + "/v1/completions", json=STREAM, headers=normal, timeout=120)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["text"]

    cases = hostile_requests()
    assert len(cases) >= 50
    readiness: list[int] = []
    stop_polling = threading.Event()

    def poll_ready() -> None:
        with httpx.Client(base_url=live_server.url, timeout=30) as c:
            while not stop_polling.is_set():
                readiness.append(c.get("/ready").status_code)
                time.sleep(0.05)

    def send(case: tuple[str, str, bytes, str | None]) -> tuple[str, int, dict[str, Any], str | None]:
        label, path, body, param = case
        r = httpx.post(live_server.url + path, content=body, headers=hostile, timeout=60)
        try:
            error = r.json().get("error", {})
        except ValueError:
            error = {"unparsed": r.text[:200]}
        return label, r.status_code, error, param

    poller = threading.Thread(target=poll_ready, daemon=True)
    poller.start()
    text, answers = stream_beside(live_server, normal, lambda pool: pool.map(send, cases), workers=6)
    stop_polling.set()
    poller.join(timeout=10)

    assert text == expected
    by_status = Counter(status for _, status, _, _ in answers)
    wrong = [
        (label, status, error)
        for label, status, error, param in answers
        if status != 400 or not names(error.get("param"), param)
    ]
    assert not wrong, "\n".join(map(repr, wrong))
    assert all(error.get("code") == "invalid_json" for _, _, error, param in answers if param is None)
    assert by_status == {400: len(cases)}
    assert readiness and set(readiness) == {200}
    assert live_server.admin.get("/ready").status_code == 200
    engine = live_server.serving.engine.engine
    assert engine.is_healthy and engine.guard.num_failed_steps == 0  # none got as far as a step
    print(
        f"\nhostile: {len(cases)} requests, by status {dict(by_status)}; /ready polled {len(readiness)}x, all 200"
    )


POISON_SEED = 424242


class SeedPoisonedSampler:
    """The live engine's sampler, except that a batch holding a request seeded POISON_SEED raises: a value
    the door let through that breaks the step for everyone in its batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def _check(self, requests: list[Any]) -> None:
        if any(r.params.seed == POISON_SEED for r in requests):
            raise OverflowError("Overflow when unpacking long long")

    def __call__(self, logits: Any, requests: list[Any]) -> Any:
        self._check(requests)
        return self.inner(logits, requests)

    def sample_tensor(self, logits: Any, requests: list[Any]) -> Any:
        self._check(requests)
        return self.inner.sample_tensor(logits, requests)


def test_a_request_that_breaks_a_step_fails_alone_settled_while_a_stream_completes(
    live_server: LiveServer,  # noqa: F811 (the imported fixture)
) -> None:
    normal = {"Authorization": f"Bearer {live_server.key(live_server.tenant()['id'])}"}
    bad_tenant = live_server.tenant()
    bad = {"Authorization": f"Bearer {live_server.key(bad_tenant['id'])}"}
    alone = httpx.post(live_server.url + "/v1/completions", json=STREAM, headers=normal, timeout=120)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["text"]
    engine = live_server.serving.engine.engine
    failed_before = engine.guard.num_failed_requests
    inner = engine.engine.sampler
    engine.engine.sampler = SeedPoisonedSampler(inner)
    try:
        body = {"model": "demo-model", "prompt": "hi", "max_tokens": 8, "seed": POISON_SEED}
        url = live_server.url + "/v1/completions"
        text, answers = stream_beside(  # three poisoned requests join the running stream's batches
            live_server,
            normal,
            lambda pool: [pool.submit(httpx.post, url, json=body, headers=bad, timeout=60) for _ in range(3)],
            workers=3,
        )
    finally:
        engine.engine.sampler = inner
    assert text == expected
    assert [r.status_code for r in answers] == [503] * 3, [r.text for r in answers]
    assert engine.is_healthy and engine.guard.num_failed_requests - failed_before == 3
    assert live_server.admin.get("/ready").status_code == 200
    rows = [r for r in live_server.usage_rows() if str(r["tenant_id"]) == bad_tenant["id"]]
    deadline = time.monotonic() + 10
    while any(r["status"] == "reserved" for r in rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = [r for r in live_server.usage_rows() if str(r["tenant_id"]) == bad_tenant["id"]]
    assert sorted(r["status"] for r in rows) == ["error"] * 3  # each settled once, as its own failure
