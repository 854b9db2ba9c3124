"""app/scaleout/wire.py: the deltas a replica sends rebuild exactly the RequestOutputs the engine made,
for two choices finishing at different steps, with logprobs."""

from __future__ import annotations

from app.scaleout.wire import Encode, Rebuild
from engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput

PROMPT = [1, 2, 3]
PROMPT_LOGPROBS = [None, {2: Logprob(-1.0, 1)}, {3: Logprob(-2.0, 2), 4: Logprob(-0.5, 1)}]


def snapshots() -> list[RequestOutput]:
    """What the engine yields: cumulative snapshots, each with only the choices that changed."""
    steps = [
        {0: ([10], "a"), 1: ([20], "x")},
        {0: ([10, 11], "ab"), 1: ([20, 21], "xy")},
        {1: ([20, 21, 22], "xyz")},
    ]
    outs, prev = [], {0: ([], ""), 1: ([], "")}
    for n, step in enumerate(steps):
        last = n == len(steps) - 1
        choices = []
        for index, (ids, text) in step.items():
            p_ids, p_text = prev[index]
            done = last or (index == 0 and n == 1)
            choices.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=list(ids),
                    delta_text=text[len(p_text) :],
                    delta_token_ids=ids[len(p_ids) :],
                    finish_reason="length" if done else None,
                    logprobs=[{t: -0.5} for t in ids],
                )
            )
            prev[index] = (ids, text)
        metrics = RequestMetrics(arrival_time=1.0, first_scheduled_time=1.5)
        # As the engine does: prompt logprobs in the first output and the last, None in between.
        prompt_logprobs = PROMPT_LOGPROBS if n in (0, len(steps) - 1) else None
        outs.append(
            RequestOutput(
                "r",
                PROMPT,
                choices,
                finished=last,
                num_cached_tokens=2,
                metrics=metrics,
                prompt_logprobs=prompt_logprobs,
            )
        )
    return outs


def test_deltas_rebuild_the_engine_outputs() -> None:
    encode, rebuild = Encode(), Rebuild("r", PROMPT)
    sent = []
    for original in snapshots():
        delta = encode(original)
        assert all(len(c.delta_token_ids) <= 1 for c in delta.choices)  # only what changed travels
        assert rebuild(delta) == original
        sent.append(delta.prompt_logprobs is not None)
    assert sent == [True, False, False]  # the prompt logprobs travel once
