"""Sampling with speculation keeps the target's distribution: a chi-square test of the first two output
tokens (jointly) over many draws, against the exact distribution computed from transformers' logits, with
and without speculation; and the same draws against what an accept-everything verifier would give must
fail (the test has the power to see a wrong verifier)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from tests.engine.spec_helpers import make_llm
from tests.helpers.hf_models import hf_logits, load_hf, make_tiny_model

DRAWS = 600
TOP_K = 3
PROMPT = [0, 17, 301, 45, 99, 250, 7]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("spec-dist") / "base", "llama")


def top_k_probs(logits: torch.Tensor) -> dict[int, float]:
    vals, ids = logits.topk(TOP_K)
    return dict(zip(ids.tolist(), torch.softmax(vals, dim=-1).tolist(), strict=True))


def exact_joint(base: Path) -> dict[tuple[int, int], float]:
    model = load_hf(base)
    with torch.no_grad():
        first = top_k_probs(hf_logits(model, PROMPT)[-1])
        return {
            (t0, t1): p0 * p1
            for t0, p0 in first.items()
            for t1, p1 in top_k_probs(hf_logits(model, [*PROMPT, t0])[-1]).items()
        }


class GreedyPathProposer:
    """Always drafts the greedy continuation of the prompt, whatever was sampled before."""

    def __init__(self, greedy: list[int]) -> None:
        self.greedy = greedy

    def propose(self, requests, max_lens):
        return [
            self.greedy[r.num_output_tokens : r.num_output_tokens + k]
            for r, k in zip(requests, max_lens, strict=True)
        ]

    def retain(self, running):
        pass


def p_value(counts: Counter, expected: dict[tuple[int, int], float]) -> float:
    """Pearson chi-square goodness of fit; bins expected below 5 draws pooled into one."""
    n = sum(counts.values())
    assert set(counts) <= set(expected), "a draw outside the support"
    big = [k for k, p in expected.items() if p * n >= 5]
    small = [k for k in expected if k not in big]
    observed = [counts[k] for k in big] + ([sum(counts[k] for k in small)] if small else [])
    wanted = [expected[k] * n for k in big] + ([sum(expected[k] for k in small) * n] if small else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.slow
def test_joint_distribution_of_two_tokens_is_kept(base, one_torch_thread):
    expected = exact_joint(base)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=TOP_K, ignore_eos=True)  # a draft at token 2
    greedy = make_llm(base).generate([PROMPT], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    plain = make_llm(base, max_num_seqs=128, num_kv_blocks=1024).generate([PROMPT] * DRAWS, params)
    spec_llm = make_llm(base, {"method": "ngram", "num_speculative_tokens": 1, "min_acceptance_rate": 0.0},
                        max_num_seqs=128, num_kv_blocks=1024)  # fmt: skip
    spec_llm.engine.spec.proposer = GreedyPathProposer(greedy[0].outputs[0].token_ids)
    spec = spec_llm.generate([PROMPT] * DRAWS, params)
    stats = spec_llm.engine.spec.stats
    assert stats.num_drafts == DRAWS and 0 < stats.num_accepted_tokens < DRAWS
    plain_counts = Counter(tuple(o.outputs[0].token_ids[:2]) for o in plain)
    spec_counts = Counter(tuple(o.outputs[0].token_ids[:2]) for o in spec)
    assert p_value(plain_counts, expected) > 1e-3  # control: the test's own distribution is right
    assert p_value(spec_counts, expected) > 1e-3
    # Power: a verifier that accepted every draft would make the second token the greedy one whenever the
    # first is; these draws must refute that distribution.
    g0, g1 = greedy[0].outputs[0].token_ids[:2]
    wrong = {k: (0.0 if k[0] == g0 else p) for k, p in expected.items()}
    wrong[(g0, g1)] = sum(p for k, p in expected.items() if k[0] == g0)
    wrong = {k: max(p, 1e-9) for k, p in wrong.items()}
    assert p_value(spec_counts, wrong) < 1e-6
