"""speculative_config checks, the n-gram lookup, the adaptive switch and the counters (pure Python)."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.spec.config import SpeculativeConfig
from engine.spec.ngram import propose_ngram
from engine.spec.stats import SpecStats
from engine.spec.switch import SpecSwitch


def test_off_by_default_and_a_dict_becomes_a_checked_config():
    assert EngineConfig(model="m").speculative is None
    cfg = EngineConfig(model="m", speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                       "prompt_lookup_min": 2, "prompt_lookup_max": 5})  # fmt: skip
    assert cfg.speculative == SpeculativeConfig("ngram", 4, 2, 5)
    draft = EngineConfig(
        model="m", speculative_config={"method": "draft_model", "model": "d", "num_speculative_tokens": 2}
    )
    assert draft.speculative is not None and draft.speculative.model == "d"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "prompt_lookup_min",
        ),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "model"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
            "disable_by_batch_size",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "min_acceptance_rate": 2.0}, "min_acceptance_rate"),
        ({"method": "ngram", "num_speculative_tokens": 2, "window_steps": 0}, "window_steps"),
        ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "typo"),
        ("ngram", "speculative_config"),
    ],
)
def test_bad_speculative_config_names_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="m", speculative_config=value)


def test_ngram_finds_the_longest_most_recent_match():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    assert propose_ngram(tokens, 1, 3, 2) == [7, 1]  # [1, 2, 3] last seen at 4: 7 followed
    assert propose_ngram(tokens, 4, 5, 2) == []  # no 4-gram repeats
    assert propose_ngram([5, 6, 7, 8], 1, 3, 3) == []
    # Longest first: the 2-gram [4, 5] occurs at 0 (then 6); the 1-gram [5] more recently at 4 (then 8).
    assert propose_ngram([4, 5, 6, 5, 8, 4, 5], 1, 2, 1) == [6]
    assert propose_ngram([4, 5, 6, 5, 8, 4, 5], 1, 1, 1) == [8]


def test_ngram_continues_a_short_loop_through_its_own_drafts():
    assert propose_ngram([3, 1, 2, 1, 2], 2, 2, 5) == [1, 2, 1, 2, 1]
    assert propose_ngram([7, 7, 7], 1, 3, 4) == [7, 7, 7, 7]


def config(**kw) -> SpeculativeConfig:
    values = {"method": "ngram", "num_speculative_tokens": 4, "min_acceptance_rate": 0.5, "window_steps": 2,
              "backoff_steps": 3, "max_backoff_steps": 12, **kw}  # fmt: skip
    return SpeculativeConfig(**values)


def test_switch_pauses_below_the_rate_doubles_its_pause_and_resets_on_success():
    s = SpecSwitch(config())
    assert s.on(1)
    s.record(4, 1)
    assert s.on(1)  # window not full yet
    s.record(4, 0)
    assert not s.on(1) and s.paused_steps == 3 and s.num_switch_offs == 1
    for _ in range(3):
        assert not s.on(1)
        s.tick()
    assert s.on(1)  # probe
    s.record(4, 0)
    s.record(4, 0)
    assert s.paused_steps == 6  # doubled
    for _ in range(6):
        s.tick()
    s.record(4, 4)
    s.record(4, 3)
    assert s.on(1) and s.backoff == 3  # a good window: back to the base pause
    s.record(0, 0)  # steps without drafts do not count
    assert s._window_steps == 0


def test_switch_caps_its_pause_and_the_batch_size_limit():
    s = SpecSwitch(config(disable_by_batch_size=8))
    assert s.on(8) and not s.on(9)
    for _ in range(10):
        s.record(4, 0)
        s.record(4, 0)
        s.paused_steps = 0
    assert s.backoff == 12
    assert SpecSwitch(config(min_acceptance_rate=0.0)).on(100)


def test_stats_count_drafts_tokens_and_positions():
    stats = SpecStats()
    stats.record(4, 2)
    stats.record(3, 3)
    stats.record(4, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 11, 5)
    assert stats.accepted_per_pos == [2, 2, 1, 0]


def test_drafts_never_take_blocks_another_running_request_needs():
    from engine.block_manager import BlockManager
    from engine.request import Request
    from engine.sampling_params import SamplingParams
    from engine.scheduler import Scheduler

    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, None, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    a, b = Request("a", [1, 2, 3, 4], params), Request("b", [5, 6, 7, 8], params)
    for r in (a, b):
        sched.add(r)
    sched.advance(sched.schedule())  # both prefilled: 2 blocks used, 2 free
    for r in (a, b):
        r.append_token(9)
    a.spec_token_ids = [9, 9, 9, 9, 9]  # would need 2 more blocks: b's next token needs the last one
    out = sched.schedule()
    assert out.scheduled == [(a, 1), (b, 1)] and not out.preempted
    assert a.spec_token_ids == []
    sched.advance(out)
    for r in (a, b):
        r.append_token(9)
    a.spec_token_ids = [9, 9]  # fits beside b's own block
    out = sched.schedule()
    assert out.scheduled == [(a, 3), (b, 1)] and not out.preempted
