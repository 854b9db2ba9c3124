"""Async scheduling (issue 7): the next decode step is launched with the sampled tokens still on the
device, before the host reads them. It must change nothing a caller can see: the same outputs from the
same step() calls, on a mix of what ends a request early (EOS, stop strings, stop token ids, max_tokens,
the context limit, aborts), adapters and base rows, prefix-cache hits, preemption and non-greedy rows
(which turn it off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import LoRARequest
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/engine/conftest.py; so is `demo`


def _engine(demo: Path, ahead: bool, **overrides: Any) -> LLMEngine:
    config = dict(
        model=str(demo), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=8,
        max_num_batched_tokens=64, max_loras=2, max_cpu_loras=2, max_lora_rank=16, max_model_len=40,
        async_scheduling=ahead,
    )  # fmt: skip
    config.update(overrides)
    return LLMEngine.from_config(EngineConfig(**config))


def _greedy(i: int) -> SamplingParams:
    kinds = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.0, stop=["e", "th"]),  # surely met: stops early
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),  # runs into max_model_len
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[390, 20, 113, 25]),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.0, n=2),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=False),
    ]
    return kinds[i % len(kinds)]


def _trace(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams, Any]], late: bool,
           abort_at: dict[int, str]) -> list[Any]:  # fmt: skip
    """Add the requests (with `late`, the second half after a few steps), abort some after given calls,
    step to the end; every step()'s outputs."""
    half = len(requests) // 2 if late else len(requests)

    def add(batch):
        for rid, ids, params, lora in batch:
            engine.add_request(rid, ids, params, lora=lora, cache_salt="t" + rid[-1], fairness_key=rid[-1])

    add(requests[:half])
    trace: list[Any] = []
    calls = 0
    while engine.has_unfinished() or calls < 4:
        if calls == 4:
            add(requests[half:])
        if calls in abort_at:
            aborted = engine.abort(abort_at[calls])
            trace.append([_row(aborted)] if aborted is not None else [])
        trace.append([_row(out) for out in engine.step()])
        calls += 1
    return trace


def _row(out: Any) -> tuple[Any, ...]:
    completions = [
        (c.index, c.text, c.token_ids, c.delta_token_ids, c.finish_reason, c.stop_reason) for c in out.outputs
    ]
    return (out.request_id, out.finished, completions, out.num_cached_tokens, out.error)


def _finals(trace: list[Any]) -> dict[str, Any]:
    """Each request's last output, and its streamed deltas joined (they must add up to its tokens)."""
    last: dict[str, Any] = {}
    deltas: dict[str, dict[int, list[int]]] = {}
    for step in trace:
        for rid, _, completions, cached, error in step:
            seqs = last.setdefault(rid, ({}, cached, error))[0]  # an output holds the sequences that moved
            last[rid] = (seqs, cached, error)
            for c in completions:
                seqs[c[0]] = c
                deltas.setdefault(rid, {}).setdefault(c[0], []).extend(c[3])
    for rid, (seqs, _, _) in last.items():
        assert {i: c[2] for i, c in seqs.items()} == deltas[rid], rid
    return last


def _requests(demo: Path, engine: LLMEngine, params_of) -> list[tuple[str, list[int], SamplingParams, Any]]:
    tok = engine.tokenizer
    loras = [
        LoRARequest(name, str(demo / "adapters" / name))
        for name in sorted(p.name for p in (demo / "adapters").iterdir())
    ]
    texts = ["Hello, world!", "The sea was calm", "Once upon a time", "def add(a, b):", "Hello, world! Again"]
    out = []
    for i in range(12):
        lora = None if i % 3 == 0 else loras[i % len(loras)]
        out.append((f"r{i}", tok.encode(texts[i % len(texts)]), params_of(i), lora))
    return out


def _resident(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams, Any]]) -> None:
    """Adapters loaded before the run: background loads would make admission depend on timing."""
    cache = engine.adapter_cache
    for lora in {r[3].content_hash: r[3] for r in requests if r[3] is not None}.values():
        while cache.acquire(lora) is None:
            cache.wait_for_loads(timeout=1.0)
        cache.release(lora)


def _both(
    demo: Path, params_of, late: bool = False, abort_at: dict[int, str] | None = None, **overrides: Any
):
    runs = []
    for ahead in (False, True):
        engine = _engine(demo, ahead, **overrides)
        requests = _requests(demo, engine, params_of)
        _resident(engine, requests)
        trace = _trace(engine, requests, late, abort_at or {})
        bm = engine.block_manager
        runs.append(
            (
                trace,
                engine.num_steps_ahead,
                engine.scheduler.num_preemptions,
                bm.num_free_blocks,
                bm.num_blocks,
            )
        )
        engine.close()
    return runs


def test_same_outputs_step_by_step_with_stops_adapters_and_cache_hits(demo: Path) -> None:
    """12 requests, 8 seats: admissions as others stop (EOS, stop strings and ids, max_tokens, context)."""
    (sync, sync_ahead, _, _, _), (ahead, steps_ahead, _, free, total) = _both(demo, _greedy)
    assert ahead == sync
    assert sync_ahead == 0 and steps_ahead > 10  # the async path really ran, most of the time
    assert free == total  # nothing leaked: the extra token of a stopped request freed with its blocks
    finals = _finals(ahead)
    reasons = {c[4] for seqs, _, _ in finals.values() for c in seqs.values()}
    assert {"stop", "length"} <= reasons and any(
        c[5] is not None for s, _, _ in finals.values() for c in s.values()
    )
    assert max(cached for _, cached, _ in finals.values()) > 0  # prefix-cache hits on shared prompts


def test_late_arrivals_and_aborts_give_the_same_text(demo: Path) -> None:
    """Requests arriving while a step ahead runs join one step later, so the steps shift by one; every
    request's text is the same, and an aborted one's tokens are a prefix of the other run's."""
    aborts = {3: "r1", 9: "r7", 12: "r4"}
    (sync, _, _, _, _), (ahead, steps_ahead, _, free, total) = _both(
        demo, _greedy, late=True, abort_at=aborts
    )
    a, b = _finals(sync), _finals(ahead)
    assert a.keys() == b.keys() and steps_ahead > 10 and free == total
    aborted = 0
    for rid in a:
        x, y = a[rid][0][0], b[rid][0][0]  # sequence 0's (index, text, tokens, delta, finish, stop)
        if "abort" in (x[4], y[4]):  # aborted in one run at least (the other may have finished first)
            aborted += 1
            assert x[2][: len(y[2])] == y[2] or y[2][: len(x[2])] == x[2], rid
        else:
            assert a[rid] == b[rid], rid
    assert aborted >= 2


def test_same_outputs_under_preemption(demo: Path) -> None:
    """Too few blocks: schedule_ahead declines, schedule() preempts, and the chain picks up again."""
    (sync, _, sync_pre, _, _), (ahead, steps_ahead, pre, free, total) = _both(demo, _greedy, num_kv_blocks=24)
    assert ahead == sync and pre == sync_pre > 0 and steps_ahead > 0 and free == total


def test_seeded_sampling_goes_ahead_with_the_same_draws(demo: Path) -> None:
    """Temperature, top-k, top-p and min-p rows are sampled on the device too; each seeded request draws
    from its own generator once a step either way, so the text is the same."""

    def params_of(i: int) -> SamplingParams:
        kinds = [
            SamplingParams(max_tokens=14, temperature=0.8, seed=i),
            SamplingParams(max_tokens=9, temperature=1.0, top_k=20, seed=100 + i),
            SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, min_p=0.05, seed=7 * i, stop=["e"]),
            SamplingParams(max_tokens=10, temperature=0.0),
        ]
        return kinds[i % len(kinds)]

    (sync, _, _, _, _), (ahead, steps_ahead, _, free, total) = _both(demo, params_of)
    assert ahead == sync and steps_ahead > 5 and free == total


def test_rows_that_need_their_tokens_turn_it_off(demo: Path) -> None:
    """Logprobs (read back), penalties and min_tokens (they depend on the tokens so far) keep a step
    synchronous while such a row runs; the outputs do not change."""

    def params_of(i: int) -> SamplingParams:
        if i % 3 == 1:
            return SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
        if i % 3 == 2:
            return SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.2, min_tokens=3)
        return SamplingParams(max_tokens=12, temperature=0.0)

    (sync, _, _, _, _), (ahead, steps_ahead, _, _, _) = _both(demo, params_of)
    assert ahead == sync
    # Only the tail after those rows finished went ahead.
    plain = _both(demo, lambda i: SamplingParams(max_tokens=12, temperature=0.0))[1][1]
    assert 0 < steps_ahead < plain


def test_the_step_ahead_takes_its_ids_from_the_device(demo: Path) -> None:
    """A step ahead's input ids come from the tensor, not from the request (whose token is not there)."""
    engine = _engine(demo, ahead=False)
    engine.add_request(
        "x", engine.tokenizer.encode("Hello, world!"), SamplingParams(max_tokens=8, temperature=0.0)
    )
    engine.step()  # prefill; one token sampled and appended
    (req,) = engine.scheduler.running
    runner = engine.runner
    batch = engine.scheduler.schedule().scheduled
    logits_a = runner.execute(batch).clone()  # computes position p with the known token
    token = req.all_token_ids[-1]
    # Now the same position again, ahead-style: the token comes from input_ids, the request lacks it.
    req.all_token_ids.pop()
    with pytest.raises(ValueError, match="one id per request"):
        runner.execute(batch, input_ids=torch.tensor([token, token]))
    logits_b = runner.execute(batch, input_ids=torch.tensor([token]))
    torch.testing.assert_close(logits_b, logits_a)
    wrong = runner.execute(batch, input_ids=torch.tensor([(token + 1) % 512]))
    assert not torch.allclose(wrong, logits_a)  # positive control: the id really is the tensor's
    with pytest.raises(ValueError, match="cannot compute"):
        req.all_token_ids.append(token)  # the token is known: an ahead step would skip a position
        runner.execute(batch, input_ids=torch.tensor([token]))


def test_constrained_rows_go_ahead_with_the_same_text(demo: Path) -> None:
    """Every row constrained (greedy and seeded sampling): a step is launched ahead and sampled once the
    host has accepted the tokens before it into the grammars, so steps go ahead and the text is the same
    as with synchronous steps, each following its grammar."""
    import re

    from engine.structured import StructuredSpec

    choices = ("yes", "no", "maybe later")
    specs = [
        StructuredSpec("choice", choices),
        StructuredSpec("regex", "[0-9]{3}-[a-z]{2}"),
        StructuredSpec("json"),
    ]

    def params_of(i: int) -> SamplingParams:
        sampled = {"temperature": 0.9, "seed": i} if i % 2 else {"temperature": 0.0}
        return SamplingParams(max_tokens=20, structured=specs[i % 3], **sampled)

    (sync, sync_ahead, _, _, _), (ahead, steps_ahead, _, free, total) = _both(demo, params_of)
    assert ahead == sync
    assert sync_ahead == 0 and steps_ahead > 5 and free == total
    for rid, (seqs, _, error) in _finals(ahead).items():
        text, kind = seqs[0][1], int(rid[1:]) % 3
        assert error is None, (rid, error)
        if kind == 0:
            assert text in choices, text
        elif kind == 1:
            assert re.fullmatch("[0-9]{3}-[a-z]{2}", text), text
        else:
            assert text.startswith("{") or text.startswith("["), text
