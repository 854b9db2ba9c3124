"""A list of prompts as one CompletionRun (RunDriver with a scripted engine, no server): every prompt's
engine request merged with its choices re-indexed p * n + i, usage summed, each prompt counted against the
process's capacity, and all of them aborted when the client goes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.domain.completions import echo
from app.domain.completions.params import RequestError, SamplingSpec
from app.domain.completions.run import Caller, CompletionRun, RunDriver, Target
from app.domain.completions.schemas import CompletionLogprobs
from engine.request import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams


class ScriptedEngine:
    """Each engine request makes `steps` outputs of n choices; prompt p's cached tokens are p."""

    def __init__(self, steps: int = 3, hang: bool = False) -> None:
        self.steps, self.hang = steps, hang
        self.started: list[str] = []
        self.aborted: list[str] = []

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, *_: Any
    ) -> AsyncIterator[RequestOutput]:
        self.started.append(request_id)
        for step in range(1, self.steps + 1):
            await asyncio.sleep(0.001 * len(prompt))  # prompts interleave
            done = step == self.steps and not self.hang
            choices = [
                CompletionOutput(
                    i, f"{request_id}/{i}:{step}", list(range(step)), finish_reason="length" if done else None
                )
                for i in range(params.n)
            ]
            yield RequestOutput(request_id, prompt, choices, finished=done, num_cached_tokens=len(prompt) - 1)
        if self.hang:
            await asyncio.Event().wait()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def make_run(prompts: list[list[int]], n: int) -> CompletionRun:
    spec = SamplingSpec(SamplingParams(n=n, max_tokens=3))
    run = CompletionRun("cmpl-x", Caller(None, "t", None), Target("demo"), prompts[0], spec, "salt")
    run.extra_prompts = prompts[1:]
    return run


async def _drain(driver: RunDriver, run: CompletionRun) -> list[RequestOutput]:
    await driver.begin(run)
    outs = [out async for out in driver.outputs(run)]
    await driver.finish(run)
    return outs


def test_prompts_merge_with_indices_p_times_n_plus_i() -> None:
    engine = ScriptedEngine()
    driver = RunDriver(engine, {})  # type: ignore[arg-type]
    run = make_run([[1, 2], [3, 4, 5], [6]], n=2)
    outs = asyncio.run(_drain(driver, run))
    assert sorted(engine.started) == ["cmpl-x", "cmpl-x-1", "cmpl-x-2"]
    assert len(outs) == 9 and run.finished
    assert sorted(run.choices) == list(range(6))
    for index, choice in run.choices.items():
        p, i = divmod(index, 2)
        assert choice.text == f"{run.engine_id(p)}/{i}:3"
    assert run.prompt_tokens == 6 and run.completion_tokens == 6 * 3
    assert run.cached_tokens == 1 + 2 + 0
    assert run.reserve_tokens == 6 + 3 * 6
    assert engine.aborted == [] and driver.active == set()


def test_each_prompt_counts_against_capacity_and_all_are_aborted() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(steps=1, hang=True)
        driver = RunDriver(engine, {}, capacity=3)  # type: ignore[arg-type]
        run = make_run([[1], [2], [3]], n=1)
        await driver.begin(run)
        assert len(driver.active) == 3
        with pytest.raises(RequestError) as err:
            await driver.begin(make_run([[9]], n=1))
        assert err.value.status == 503
        outputs = driver.outputs(run)
        for _ in range(3):
            await outputs.__anext__()
        assert not run.finished
        await outputs.aclose()  # the client went away
        await driver.finish(run)
        assert sorted(engine.aborted) == ["cmpl-x", "cmpl-x-1", "cmpl-x-2"]
        assert driver.active == set()

    asyncio.run(scenario())


def test_echo_logprobs_put_the_prompt_first() -> None:
    words = {1: "<s>", 2: "Hi", 3: " there", 4: "!"}
    entries: list[dict[int, Logprob] | None] = [None, {3: Logprob(-0.5, 2), 4: Logprob(-0.2, 1)}]
    generated = CompletionLogprobs(
        tokens=["!"], token_logprobs=[-0.1], top_logprobs=[{"!": -0.1}], text_offset=[8]
    )
    out = echo.echo_logprobs([2, 3], entries, 1, words.__getitem__, generated, len("Hi there"))
    assert out.tokens == ["Hi", " there", "!"]
    assert out.token_logprobs == [None, -0.5, -0.1]
    assert out.top_logprobs == [None, {"!": -0.2}, {"!": -0.1}]
    assert out.text_offset == [0, 2, 8]
    # A BOS token is among the tokens but not in the echoed text: offsets stay inside the text.
    bos = echo.echo_logprobs([1, 2], [None, {2: Logprob(-1.0, 3)}], 0, words.__getitem__, None, 2)
    assert bos.text_offset == [0, 2] and bos.top_logprobs is None


def test_prompt_logprobs_keep_the_token_and_the_top_k() -> None:
    entry = {5: Logprob(-3.0, 7), 1: Logprob(-0.1, 1), 2: Logprob(-0.2, 2), 3: Logprob(-0.3, 3)}
    got = echo.prompt_logprobs([None, entry], 2, str, [0, 5])
    assert got[0] is None and got[1] is not None
    assert {k: (v.logprob, v.rank, v.decoded_token) for k, v in got[1].items()} == {
        "5": (-3.0, 7, "5"),
        "1": (-0.1, 1, "1"),
        "2": (-0.2, 2, "2"),
    }
