"""The adaptive switch-off inside the engine: a proposer that is never right costs a few verify steps,
then the engine runs as without speculation (async scheduling included); the batch-size limit; and the
outputs never change."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import SamplingParams
from tests.engine.spec_helpers import ScriptedProposer, continuations, make_llm, prompts
from tests.helpers.hf_models import make_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("spec-adaptive") / "base", "llama")


def spec_config(**kw) -> dict:
    return {"method": "ngram", "num_speculative_tokens": 3, "min_acceptance_rate": 0.5, "window_steps": 2,
            "backoff_steps": 4, "max_backoff_steps": 64, **kw}  # fmt: skip


def run(base: Path, spec: dict | None, ps, params, proposer_of=None):
    llm = make_llm(base, spec)
    if proposer_of is not None:
        llm.engine.spec.proposer = proposer_of(llm)
    return llm, [o.outputs[0].token_ids for o in llm.generate(ps, params)]


def test_never_accepted_drafts_switch_speculation_off_and_async_scheduling_back_on(base, one_torch_thread):
    ps = prompts(3, seed=21)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    plain, expected = run(base, None, ps, params)
    ref = plain.generate(ps, params)
    conts = continuations(None, ref, ps, [None] * 3)
    llm, got = run(base, spec_config(), ps, params, lambda _: ScriptedProposer(conts, wrong_all=True))
    assert got == expected
    spec = llm.engine.spec
    assert spec.stats.num_accepted_tokens == 0
    assert spec.switch.num_switch_offs >= 3
    # Verify steps: 2 per window, the pauses 4, 8, 16, ... steps: a handful out of ~60.
    verify_steps = spec.stats.num_drafts / 3
    assert verify_steps <= 10
    assert llm.engine.num_steps_ahead > 30  # while off, steps go ahead of the host again


def test_while_speculating_steps_do_not_go_ahead(base, one_torch_thread):
    ps = prompts(2, seed=22)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = make_llm(base)
    ref = plain.generate(ps, params)
    conts = continuations(None, ref, ps, [None] * 2)
    llm, got = run(base, spec_config(), ps, params, lambda _: ScriptedProposer(conts))
    assert got == [o.outputs[0].token_ids for o in ref]
    assert llm.engine.num_steps_ahead == 0
    assert llm.engine.spec.switch.num_switch_offs == 0
    assert plain.engine.num_steps_ahead > 0  # positive control: async scheduling is on in both


def test_disable_by_batch_size(base, one_torch_thread):
    ps = prompts(4, seed=23)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (4, 4, 20, 20)]
    plain = make_llm(base)
    ref = plain.generate(ps, params)
    conts = continuations(None, ref, ps, [None] * 4)
    calls: list[int] = []

    class Counting(ScriptedProposer):
        def propose(self, requests, max_lens):
            calls.append(len(requests))
            return super().propose(requests, max_lens)

    llm, got = run(base, spec_config(disable_by_batch_size=2), ps, params, lambda _: Counting(conts))
    assert got == [o.outputs[0].token_ids for o in ref]
    assert calls and max(calls) <= 2  # never asked while 4 ran
    assert llm.engine.spec.stats.num_accepted_tokens > 0


def test_a_proposer_that_finds_nothing_hands_the_steps_back_to_async_scheduling(base, one_torch_thread):
    class Empty:
        calls = 0

        def propose(self, requests, max_lens):
            Empty.calls += 1
            return [[] for _ in requests]

        def retain(self, running):
            pass

    ps = prompts(2, seed=24)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    _, expected = run(base, None, ps, params)
    llm, got = run(base, spec_config(), ps, params, lambda _: Empty())
    assert got == expected
    assert llm.engine.spec.stats.num_drafts == 0
    assert llm.engine.spec.switch.num_switch_offs >= 1
    assert Empty.calls < 12 and llm.engine.num_steps_ahead > 20


def test_a_failing_proposer_costs_its_drafts_not_the_requests(base, one_torch_thread):
    class Broken:
        calls = 0

        def propose(self, requests, max_lens):
            Broken.calls += 1
            raise ValueError("proposer bug")

        def retain(self, running):
            pass

    ps = prompts(2, seed=25)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    _, expected = run(base, None, ps, params)
    _, got = run(base, spec_config(min_acceptance_rate=0.0), ps, params, lambda _: Broken())
    assert got == expected and Broken.calls > 0


def test_probes_draft_a_few_sequences_in_turn_until_a_window_is_good(base, one_torch_thread):
    """A probe on a big batch asks the proposer for probe_max_seqs sequences, the same few each step (a
    draft model's KV of them stays warm); after a good window every sequence drafts; a proposer that is
    never right is never asked for more."""
    ps = prompts(6, seed=25)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = make_llm(base)
    ref = plain.generate(ps, params)
    conts = continuations(None, ref, ps, [None] * 6)
    for wrong in (False, True):
        calls: list[list[str]] = []

        class Counting(ScriptedProposer):
            def propose(self, requests, max_lens, calls=calls):
                calls.append([r.request_id for r in requests])
                return super().propose(requests, max_lens)

        def proposer(llm, w=wrong):  # type: ignore[no-untyped-def]
            llm.engine.spec.pad = True  # as with CUDA graphs: the 4 others verify fillers
            return Counting(conts, wrong_all=w)

        llm, got = run(base, spec_config(probe_max_seqs=2), ps, params, proposer)
        assert got == [o.outputs[0].token_ids for o in ref]
        assert [len(c) for c in calls[:2]] == [2, 2] and calls[0] == calls[1]
        if wrong:
            assert max(len(c) for c in calls) == 2
            # Only the proposer's drafts count (for the switch too), never the others' fillers.
            assert llm.engine.spec.stats.num_drafts == 2 * len(calls)
        else:
            assert max(len(c) for c in calls) == 6  # the first window was good: everyone drafts
