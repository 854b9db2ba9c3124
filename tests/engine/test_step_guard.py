"""A step that raises because of one request's data fails that request alone; the rest finish unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    RequestFailedError,
    SamplingParams,
)
from engine.step_guard import EngineFault, StepGuard, is_engine_fault
from tests.helpers.hf_models import make_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = {f"ok{i}": [0, 11 + i, 40 + 3 * i, 7] for i in range(4)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("guard") / "base", "llama")


def config(base: Path, async_scheduling: bool = True) -> EngineConfig:
    return EngineConfig(
        model=str(base),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_kv_blocks=256,
        async_scheduling=async_scheduling,
    )


@pytest.fixture(scope="module")
def expected(base: Path) -> dict[str, list[int]]:
    """Each good prompt's greedy tokens, run alone by an engine nothing is wrong with."""
    engine = LLMEngine.from_config(config(base, async_scheduling=False))
    out: dict[str, list[int]] = {}
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY)
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    out[rid] = o.outputs[0].token_ids
    return out


class PoisonedSampler:
    """The engine's sampler, except that any batch holding a request whose id starts with "bad" raises,
    as a value the door did not foresee would inside the sampling kernels."""

    def __init__(self, inner, exc: Exception | None = None) -> None:
        self.inner = inner
        self.exc = exc or OverflowError("Overflow when unpacking long long")
        self.batches_refused = 0

    def _check(self, requests) -> None:
        if any(r.request_id.startswith("bad") for r in requests):
            self.batches_refused += 1
            raise self.exc

    def __call__(self, logits, requests):
        self._check(requests)
        return self.inner(logits, requests)

    def sample_tensor(self, logits, requests):
        self._check(requests)
        return self.inner.sample_tensor(logits, requests)


def run_guarded(engine: LLMEngine, guard: StepGuard, steps: int = 500) -> dict[str, object]:
    """Step like AsyncLLMEngine's loop does; final token ids per request, or "error" for a failed one."""
    results: dict[str, object] = {}
    for _ in range(steps):
        if not engine.has_unfinished():
            return results
        guard.before_step()
        try:
            outputs = engine.step()
        except Exception as exc:
            outputs = guard.recover(exc)
        else:
            guard.succeeded()
        for o in outputs:
            if o.finished or o.error:
                results[o.request_id] = "error" if o.error else o.outputs[0].token_ids
    raise AssertionError(f"still running after {steps} steps: {results}")


def step_until_it_fails(engine: LLMEngine, guard: StepGuard) -> list:
    """Step (an async-scheduled step may only launch the next) until one raises; recover from it."""
    for _ in range(4):
        guard.before_step()
        try:
            engine.step()
        except OverflowError as exc:
            return guard.recover(exc)
        guard.succeeded()
    raise AssertionError("no step failed")


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_request_that_breaks_its_step_fails_alone_and_the_others_finish_unchanged(
    base, expected, async_scheduling
):
    engine = LLMEngine.from_config(config(base, async_scheduling))
    engine.sampler = PoisonedSampler(engine.sampler)
    guard = StepGuard(engine)
    engine.add_request("ok0", PROMPTS["ok0"], GREEDY)
    engine.add_request("ok1", PROMPTS["ok1"], GREEDY)
    for _ in range(3):  # the good ones are decoding when the bad one arrives
        engine.step()
    engine.add_request("bad", [0, 5, 6], GREEDY)
    engine.add_request("ok2", PROMPTS["ok2"], GREEDY)
    engine.add_request("ok3", PROMPTS["ok3"], GREEDY)
    results = run_guarded(engine, guard)
    assert results.pop("bad") == "error"
    assert results == expected
    assert guard.num_failed_requests == 1 and guard.num_failed_steps >= 1
    # Nothing left behind: no blocks held, nobody waiting or held, and the engine serves again.
    assert not engine.scheduler.running and not engine.scheduler.waiting() and not guard.held
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.sampler = engine.sampler.inner
    engine.add_request("again", PROMPTS["ok0"], GREEDY)
    assert run_guarded(engine, guard) == {"again": expected["ok0"]}


def test_a_lone_bad_request_is_blamed_at_once(base):
    engine = LLMEngine.from_config(config(base))
    engine.sampler = sampler = PoisonedSampler(engine.sampler)
    guard = StepGuard(engine)
    engine.add_request("bad", [0, 5, 6], GREEDY)
    assert run_guarded(engine, guard) == {"bad": "error"}
    assert sampler.batches_refused == 1 and not guard.held


def test_two_bad_requests_among_good_ones_each_fail_alone(base, expected):
    engine = LLMEngine.from_config(config(base))
    engine.sampler = PoisonedSampler(engine.sampler)
    guard = StepGuard(engine)
    for rid in ("ok0", "bad-a", "ok1", "bad-b", "ok2"):
        engine.add_request(rid, PROMPTS.get(rid, [0, 9, 9]), GREEDY)
    results = run_guarded(engine, guard)
    assert results.pop("bad-a") == "error" and results.pop("bad-b") == "error"
    assert results == {k: expected[k] for k in ("ok0", "ok1", "ok2")}
    assert guard.num_failed_requests == 2


def test_a_request_on_trial_is_not_blamed_for_a_newcomers_fault(base, expected):
    engine = LLMEngine.from_config(config(base))
    engine.sampler = PoisonedSampler(engine.sampler)
    guard = StepGuard(engine)
    for rid in ("ok0", "ok1", "bad-a"):
        engine.add_request(rid, PROMPTS.get(rid, [0, 9, 9]), GREEDY)
    step_until_it_fails(engine, guard)  # three new requests: all held, none blamed yet
    assert len(guard.held) == 3 and guard.num_failed_requests == 0
    engine.add_request("bad-b", [0, 8, 8], GREEDY)  # joins the first trial's step, and breaks it
    results = run_guarded(engine, guard)
    assert results.pop("bad-a") == "error" and results.pop("bad-b") == "error"
    assert results == {k: expected[k] for k in ("ok0", "ok1")}


def test_a_decoding_request_is_cleared_and_never_held(base, expected):
    engine = LLMEngine.from_config(config(base))
    engine.sampler = PoisonedSampler(engine.sampler)
    guard = StepGuard(engine)
    engine.add_request("ok0", PROMPTS["ok0"], GREEDY)
    for _ in range(3):
        guard.before_step()
        engine.step()
    engine.add_request("bad", [0, 5, 6], GREEDY)
    outputs = step_until_it_fails(engine, guard)
    assert [o.request_id for o in outputs] == ["bad"] and outputs[0].error
    assert not guard.held and guard.num_failed_requests == 1
    assert run_guarded(engine, guard) == {"ok0": expected["ok0"]}


def test_an_aborted_suspect_leaves_the_held_list(base):
    engine = LLMEngine.from_config(config(base))
    engine.sampler = PoisonedSampler(engine.sampler)
    guard = StepGuard(engine)
    engine.add_request("ok0", PROMPTS["ok0"], GREEDY)
    engine.add_request("bad", [0, 5, 6], GREEDY)
    with pytest.raises(OverflowError):
        engine.step()
    guard.recover(OverflowError("x"))
    assert {r.request_id for r in guard.held} == {"ok0", "bad"}
    guard.unhold("bad")
    assert engine.abort("bad").outputs[0].finish_reason == "abort"
    assert [r.request_id for r in guard.held] == ["ok0"]
    assert list(run_guarded(engine, guard)) == ["ok0"]


def test_engine_faults_are_not_blamed_on_requests(base):
    import torch

    assert is_engine_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_engine_fault(AssertionError("block table out of range"))
    assert is_engine_fault(EngineFault("worker 1 died"))
    assert is_engine_fault(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_engine_fault(OverflowError("Overflow when unpacking long long"))
    assert not is_engine_fault(ValueError("value cannot be converted to type float without overflow"))
    engine = LLMEngine.from_config(config(base))
    guard = StepGuard(engine, max_failed_steps=2)
    with pytest.raises(EngineFault, match="CUDA"):
        guard.recover(RuntimeError("CUDA error: device-side assert triggered"))
    guard.succeeded()
    guard.recover(KeyError("x"))
    guard.recover(KeyError("x"))
    with pytest.raises(EngineFault, match="3 steps in a row"):
        guard.recover(KeyError("x"))


async def test_the_async_engine_stays_healthy_and_streams_others_correctly(base, expected):
    eng = AsyncLLMEngine.from_config(config(base))
    eng.engine.sampler = PoisonedSampler(eng.engine.sampler)
    eng.start()
    try:

        async def good(rid: str) -> list[int]:
            outs = [o async for o in eng.generate(rid, PROMPTS[rid], GREEDY)]
            return outs[-1].outputs[0].token_ids

        async def bad(rid: str) -> None:
            with pytest.raises(RequestFailedError, match="could not process"):
                async for _ in eng.generate(rid, [0, 5, 6], GREEDY):
                    pass

        tasks = [good("ok0"), good("ok1"), bad("bad-0"), good("ok2"), bad("bad-1"), good("ok3")]
        results = await asyncio.gather(*tasks)
        assert [r for r in results if r is not None] == [expected[k] for k in ("ok0", "ok1", "ok2", "ok3")]
        assert eng.is_healthy and eng.guard.num_failed_requests == 2
        stats = eng.stats()
        assert stats.running == 0 and stats.waiting == 0
    finally:
        await eng.shutdown()


async def test_the_async_engine_dies_on_an_accelerator_error(base):
    eng = AsyncLLMEngine.from_config(config(base))
    eng.engine.sampler = PoisonedSampler(eng.engine.sampler, RuntimeError("CUDA error: device-side assert"))
    eng.start()
    try:
        with pytest.raises(EngineDeadError, match="device-side assert"):
            async for _ in eng.generate("bad", [0, 5, 6], GREEDY):
                pass
        assert not eng.is_healthy
    finally:
        await eng.shutdown()
