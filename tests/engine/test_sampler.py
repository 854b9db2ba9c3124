"""Sampler: greedy, temperature, top-k/p, min-p, penalties, min_tokens, seeds, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make(params: SamplingParams, prompt=(1,), output=(), eos=(3,)) -> Request:
    r = Request("r", list(prompt), params, eos_token_ids=tuple(eos))
    for t in output:
        r.append_token(t)
    return r


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32)


def draw_many(params: SamplingParams, logits: torch.Tensor, n: int = 1500) -> Counter:
    sampler = Sampler(CPU, seed=1)
    reqs = [make(params) for _ in range(n)]
    out = sampler(logits.unsqueeze(0).repeat(n, 1), reqs)
    return Counter(out.token_ids)


def test_greedy_is_argmax_and_does_not_touch_the_input():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
    before = logits.clone()
    out = Sampler(CPU)(logits, [make(SamplingParams(temperature=0.0)) for _ in range(2)])
    assert out.token_ids == [1, 0] and out.logprobs == [None, None]
    assert torch.equal(logits, before)


def test_temperature_sampling_follows_the_distribution():
    counts = draw_many(SamplingParams(temperature=1.0), probs_logits([0.6, 0.3, 0.1]), n=3000)
    for token, p in enumerate([0.6, 0.3, 0.1]):
        assert abs(counts[token] / 3000 - p) < 0.04, counts


def test_low_temperature_sharpens_and_high_flattens():
    logits = probs_logits([0.6, 0.3, 0.1])
    cold = draw_many(SamplingParams(temperature=0.2), logits)
    hot = draw_many(SamplingParams(temperature=5.0), logits)
    assert cold[0] / 1500 > 0.95
    assert hot[2] / 1500 > 0.2


def test_top_k_keeps_only_the_k_most_likely():
    counts = draw_many(SamplingParams(temperature=1.0, top_k=2), probs_logits([0.4, 0.3, 0.2, 0.1]))
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 1500 - 4 / 7) < 0.05


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert set(draw_many(SamplingParams(temperature=1.0, top_p=0.7), logits)) == {0, 1}
    assert set(draw_many(SamplingParams(temperature=1.0, top_p=0.5), logits)) == {0}
    assert set(draw_many(SamplingParams(temperature=1.0, top_p=0.81), logits)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert set(draw_many(SamplingParams(temperature=1.0, min_p=0.5), logits)) == {0, 1}
    assert set(draw_many(SamplingParams(temperature=1.0, min_p=0.25), logits)) == {0, 1, 2}


def test_filters_apply_per_row_in_a_mixed_batch():
    logits = probs_logits([0.4, 0.3, 0.2, 0.1]).unsqueeze(0).repeat(600, 1)
    reqs = [
        make(SamplingParams(temperature=1.0, top_k=1) if i % 3 == 0 else SamplingParams(temperature=1.0))
        for i in range(600)
    ]
    reqs[1] = make(SamplingParams(temperature=0.0))
    out = Sampler(CPU)(logits, reqs).token_ids
    assert all(out[i] == 0 for i in range(0, 600, 3)) and out[1] == 0
    assert len({out[i] for i in range(2, 600, 3)}) == 4


def test_same_seed_same_tokens_whatever_the_batch():
    vocab = 50
    torch.manual_seed(0)
    rows = torch.randn(8, vocab)

    def run(position: int, batch: int, others_seeded: bool) -> list[int]:
        sampler = Sampler(CPU, seed=position * 7 + batch)
        target = make(SamplingParams(temperature=1.0, seed=1234))
        others = [
            make(SamplingParams(temperature=1.0, seed=i if others_seeded else None)) for i in range(batch - 1)
        ]
        reqs = [*others[:position], target, *others[position:]]
        tokens = []
        for step in range(6):
            logits = rows[torch.arange(batch) % 8].roll(step, dims=1)
            logits[position] = rows[step]
            tokens.append(sampler(logits, reqs).token_ids[position])
        return tokens

    alone = run(0, 1, False)
    assert run(2, 5, False) == alone
    assert run(4, 6, True) == alone
    other_seed = make(SamplingParams(temperature=1.0, seed=99))
    sampler = Sampler(CPU)
    assert [sampler(rows[s : s + 1], [other_seed]).token_ids[0] for s in range(6)] != alone


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=5)
    out = Sampler(CPU)(logits, [make(params, prompt=(0,), output=(2,), eos=())])
    # token 0: 2.0 -> 1.0, token 2: -1.0 -> -2.0; token 1 now leads.
    assert out.token_ids == [1]
    expected = torch.log_softmax(torch.tensor([1.0, 1.5, -2.0, -1.2, 0.0]), dim=0)
    for tid, lp in out.logprobs[0].items():
        assert lp == pytest.approx(expected[tid].item(), abs=1e-5)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.6, logprobs=0)
    pres = SamplingParams(temperature=0.0, presence_penalty=1.5)
    # Token 0 appears twice in the output: 3.0 - 2*0.6 = 1.8 < 2.0. In the prompt it would not count.
    assert Sampler(CPU)(logits, [make(freq, prompt=(1, 1, 1), output=(0, 0), eos=())]).token_ids == [1]
    assert Sampler(CPU)(logits, [make(freq, prompt=(0, 0, 0), output=(), eos=())]).token_ids == [0]
    logits = torch.tensor([[3.0, 2.5, 1.6, 0.0]])
    assert Sampler(CPU)(logits, [make(pres, output=(0, 0, 0), eos=())]).token_ids == [1]  # 1.5 < 2.5
    out = Sampler(CPU)(logits, [make(pres, output=(0, 1), eos=())])  # 1.5, 1.0, 1.6
    assert out.token_ids == [2]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0.0, 0.0, 9.0, 8.0, 1.0]])  # eos = 3, stop id 4
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4])
    assert Sampler(CPU)(logits, [make(params, output=(5,))]).token_ids == [5]
    assert Sampler(CPU)(logits, [make(params, output=(5, 5))]).token_ids == [3]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    # With ignore_eos, EOS is an ordinary token (the engine does not stop on it): no need to mask it.
    assert Sampler(CPU)(logits, [make(ignore, output=(5,))]).token_ids == [3]


def test_logprobs_are_log_softmax_of_the_processed_logits_with_the_sampled_token():
    torch.manual_seed(3)
    logits = torch.randn(2, 30)
    greedy = SamplingParams(temperature=0.0, logprobs=3)
    hot = SamplingParams(temperature=0.5, top_k=5, logprobs=2, seed=7)
    out = Sampler(CPU)(logits.clone(), [make(greedy), make(hot)])
    ref0 = torch.log_softmax(logits[0], dim=0)
    top3 = ref0.topk(3).indices.tolist()
    assert list(out.logprobs[0]) == top3  # sampled (= argmax) first, then the rest of the top 3
    for tid in top3:
        assert out.logprobs[0][tid] == pytest.approx(ref0[tid].item(), abs=1e-5)
    processed = logits[1] / 0.5
    keep = processed.topk(5).indices
    masked = torch.full_like(processed, float("-inf"))
    masked[keep] = processed[keep]
    ref1 = torch.log_softmax(masked, dim=0)
    sampled = out.token_ids[1]
    assert sampled in keep.tolist()
    assert out.logprobs[1][sampled] == pytest.approx(ref1[sampled].item(), abs=1e-5)
    assert all(out.logprobs[1][t] == pytest.approx(ref1[t].item(), abs=1e-5) for t in out.logprobs[1])
    assert len(out.logprobs[1]) in (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop_and_top_k():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0


def test_any_integer_seed_works_and_logprobs_beyond_the_vocabulary_are_capped():
    logits = torch.randn(3, 8)
    reqs = [
        make(SamplingParams(temperature=1.0, seed=2**70, logprobs=20)),
        make(SamplingParams(temperature=1.0, seed=-5)),
        make(SamplingParams(temperature=1.0, seed=2**64 - 1)),
    ]
    out = Sampler(CPU)(logits, reqs)
    assert len(out.logprobs[0]) == 8 and all(0 <= t < 8 for t in out.token_ids)
    again = Sampler(CPU)(logits[:1], [make(SamplingParams(temperature=1.0, seed=2**70, logprobs=20))])
    assert again.token_ids[0] == out.token_ids[0]


def test_a_vanishing_temperature_is_greedy_not_nan():
    torch.manual_seed(4)
    logits = torch.randn(4, 50) * 30
    reqs = [make(SamplingParams(temperature=t, logprobs=1)) for t in (1e-300, 1e-7, 0.0, 1e-6)]
    out = Sampler(CPU)(logits, reqs)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert all(v == v for entry in out.logprobs for v in entry.values())  # no NaN


def _old_logprob_rows(logits: torch.Tensor, wanted: list[int | None], token_ids: list[int]) -> list:
    """The per-row extraction the sampler used before it copied the top-n lists in one go."""
    logprobs = torch.log_softmax(logits, dim=-1)
    most = min(max(w or 0 for w in wanted), logits.shape[1])
    top_vals, top_ids = logprobs.topk(most, dim=-1)
    out = []
    for row, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        entry = {token_ids[row]: logprobs[row, token_ids[row]].item()}
        for tid, val in zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist(), strict=True):
            entry.setdefault(tid, val)
        out.append(entry)
    return out


def test_plain_greedy_fast_path_equals_the_general_path(monkeypatch):
    torch.manual_seed(5)
    logits = torch.randn(64, 300)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1.0  # a tie: the first index wins on both paths
    reqs = [make(SamplingParams(temperature=0.0)) for _ in range(64)]
    assert all(r.plain_greedy for r in reqs)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        before = x.clone()
        fast = Sampler(CPU)(x, reqs)
        assert torch.equal(x, before)
        monkeypatch.setattr("engine.sampler._PLAIN_GREEDY", lambda r: False)
        general = Sampler(CPU)(x, reqs)
        monkeypatch.undo()
        assert fast.token_ids == general.token_ids == x.float().argmax(dim=-1).tolist()
        assert fast.logprobs == general.logprobs == [None] * 64
    assert fast.token_ids[3] == 7


def test_plain_greedy_flag_is_off_for_anything_beyond_argmax():
    assert make(SamplingParams(temperature=0.0)).plain_greedy
    for params in (
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0, min_tokens=1),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, frequency_penalty=-0.5),
        SamplingParams(temperature=0.0, repetition_penalty=1.1),
    ):
        r = make(params)
        assert not r.plain_greedy, params
        assert r.greedy == params.greedy and r.has_penalties == params.has_penalties


def test_one_plain_row_less_takes_the_general_path_with_the_same_tokens():
    """A batch mixing plain greedy rows with one that asks for more: the greedy rows' tokens do not move."""
    torch.manual_seed(6)
    logits = torch.randn(9, 40)
    plain = [make(SamplingParams(temperature=0.0)) for _ in range(8)]
    out = Sampler(CPU)(logits, [*plain, make(SamplingParams(temperature=0.0, min_tokens=2), output=(1,))])
    alone = Sampler(CPU)(logits[:8], plain)
    assert out.token_ids[:8] == alone.token_ids and out.logprobs == [None] * 9


def test_logprobs_of_a_mixed_batch_equal_the_per_row_extraction():
    torch.manual_seed(8)
    logits = torch.randn(6, 25)
    wanted = [None, 0, 3, None, 20, 1]
    reqs = [make(SamplingParams(temperature=0.0, logprobs=w)) for w in wanted]
    out = Sampler(CPU)(logits.clone(), reqs)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == _old_logprob_rows(logits, wanted, out.token_ids)
