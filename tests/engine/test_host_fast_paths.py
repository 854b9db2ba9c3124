"""The host-time shortcuts of a step (issue 7) change nothing: an engine with every shortcut turned off
(sampler argmax-only batches, the block manager's decode shortcut, single-sequence outputs, direct Rust
decoding) gives the same outputs, step by step, on a mix of everything the shortcuts skip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import build_group_output
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/engine/conftest.py; so is `demo`


def _params(i: int) -> SamplingParams:
    kinds = [
        SamplingParams(max_tokens=24, temperature=0.0),
        SamplingParams(max_tokens=24, temperature=0.0, stop=["e", "th"]),  # surely met: stops early
        SamplingParams(
            max_tokens=24, temperature=0.0, stop=[" "], min_tokens=4, include_stop_str_in_output=True
        ),
        SamplingParams(max_tokens=16, temperature=0.9, seed=11 + i),
        SamplingParams(max_tokens=16, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4),
        SamplingParams(max_tokens=12, temperature=0.8, n=2, seed=5),
        SamplingParams(max_tokens=20, temperature=0.0, min_tokens=6, ignore_eos=False),
        SamplingParams(max_tokens=30, temperature=1.0),  # the engine's shared generator
    ]
    return kinds[i % len(kinds)]


def _run(demo: Path) -> tuple[list[Any], int]:
    # Few KV blocks: requests get preempted and recomputed, which the shortcuts must survive too.
    config = EngineConfig(
        model=str(demo), device="cpu", dtype="float32", block_size=4, num_kv_blocks=20, max_num_seqs=8,
        max_num_batched_tokens=48, cuda_graphs=False,
    )  # fmt: skip
    engine = LLMEngine.from_config(config)
    tok = engine.tokenizer
    prompts = ["Hello, world!", "The sea was calm", "Once upon a time", "def add(a, b):", "Größe, naïve"]
    trace: list[Any] = []
    for i in range(14):
        ids = tok.encode(prompts[i % len(prompts)])
        engine.add_request(f"r{i}", ids, _params(i), cache_salt=f"t{i % 3}", fairness_key=f"t{i % 3}")
    engine.abort("r13")
    while engine.has_unfinished():
        step = []
        for out in engine.step():
            completions = [
                (c.index, c.text, c.token_ids, c.delta_text, c.delta_token_ids, c.finish_reason,
                 c.stop_reason, c.logprobs)
                for c in out.outputs
            ]  # fmt: skip
            m = out.metrics
            times = (m.first_scheduled_time is None, m.first_token_time is None, m.finished_time is None)
            step.append((out.request_id, out.finished, completions, out.num_cached_tokens, out.error, times))
        trace.append(step)
    preemptions = engine.scheduler.num_preemptions
    engine.close()
    return trace, preemptions


def test_every_shortcut_off_gives_the_same_outputs_step_by_step(demo, monkeypatch):
    fast, fast_preemptions = _run(demo)
    monkeypatch.setattr("engine.sampler._PLAIN_GREEDY", lambda r: False)
    monkeypatch.setattr(BlockManager, "allocate_slots", BlockManager._allocate)
    monkeypatch.setattr("engine.engine.build_output", build_group_output)
    monkeypatch.setattr("engine.detokenizer._plain_backend", lambda tokenizer: None)
    general, general_preemptions = _run(demo)
    assert fast == general
    assert fast_preemptions == general_preemptions > 0
    finals = [c for step in fast for out in step if out[1] for c in out[2]]
    reasons = {c[5] for c in finals}
    assert {"stop", "length"} <= reasons  # stop strings and max_tokens both ended requests
    assert any(isinstance(c[6], str) for c in finals)  # a stop string, not only EOS
    assert any(c[7] for c in finals)  # logprobs came through


def test_requests_are_compared_by_identity_not_by_their_fields():
    """list.remove over the running list must neither pick a look-alike nor compare every field."""
    a = Request("same", [1, 2, 3], SamplingParams())
    b = Request("same", [1, 2, 3], SamplingParams())
    a.metrics = b.metrics
    assert a != b and a == a
    running = [a, b]
    running.remove(b)
    assert running == [a] and running[0] is a
    assert a.is_finished is False and a.finish_reason is None
    a.status = RequestStatus.FINISHED_LENGTH
    assert a.is_finished is True and a.finish_reason == "length"
