"""A stream cut off by its client is billed the tokens whose frames went out, not what the engine made
after them (issue 13: usage rows equal what clients were told)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from app.domain.completions import responses
from app.domain.completions.params import SamplingSpec
from app.domain.completions.run import Caller, CompletionRun, Target
from engine.request import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

WORDS = ["alpha", " beta", " gamma", " delta", " eps", " zeta", " eta", " theta"]


class Driver:
    """The two things `responses.stream` uses of RunDriver: the engine's decode and finish()."""

    class engine:  # stands where RunDriver.engine stands
        @staticmethod
        def decode_token(token_id: int) -> str:
            return WORDS[token_id]

    def __init__(self) -> None:
        self.settled_with: int | None = None

    async def finish(self, run: CompletionRun) -> None:
        if self.settled_with is None:
            self.settled_with = run.completion_tokens


def output(upto: int) -> RequestOutput:
    """The engine's output after `upto` tokens (one new token per step, its word as its text)."""
    done = upto == len(WORDS)
    ids = list(range(upto))
    text = "".join(WORDS[:upto])
    choice = CompletionOutput(0, text, ids, finish_reason="length" if done else None)
    return RequestOutput("cmpl-1", [1, 2], [choice], finished=done)


def make_run() -> CompletionRun:
    spec = SamplingSpec(SamplingParams(max_tokens=len(WORDS)), stream=True, include_usage=True)
    return CompletionRun("cmpl-1", Caller(None, "t", None), Target("demo"), [1, 2], spec, "salt")


async def consume(frames_wanted: int | None) -> tuple[CompletionRun, Driver, int]:
    run, driver = make_run(), Driver()

    async def outputs() -> AsyncIterator[RequestOutput]:
        for i in range(2, len(WORDS) + 1):
            out = output(i)
            run.last, run.choices = out, {0: out.outputs[0]}  # what RunDriver.outputs records
            yield out

    first = output(1)
    run.last, run.choices = first, {0: first.outputs[0]}
    gen: Any = responses.stream(driver, run, False, outputs(), first)  # type: ignore[arg-type]
    taken = 0
    async for _ in gen:
        taken += 1
        if frames_wanted is not None and taken == frames_wanted:
            break
    await gen.aclose()  # what the server does to the body iterator when the client is gone
    return run, driver, taken


def test_a_cut_stream_is_billed_the_tokens_of_the_frames_that_went_out() -> None:
    run, driver, taken = asyncio.run(consume(3))
    # The server took frame 3 and stopped (its send failed: the client is gone) without asking for
    # frame 4: frames 1-2 went out; the engine had made 3 tokens (more in a real engine running ahead).
    assert taken == 3
    assert driver.settled_with == 2
    assert run.completion_tokens == 2 < len(run.choices[0].token_ids)


def test_a_whole_stream_is_billed_every_token_and_its_usage_chunk_says_so() -> None:
    run, driver, _ = asyncio.run(consume(None))
    assert driver.settled_with == len(WORDS) == run.completion_tokens
