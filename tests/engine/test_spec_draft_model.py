"""method "draft_model": a second model drafts greedily on its own KV cache. The target itself as its own
draft is accepted whole on base requests (a check that the draft's KV bookkeeping, catch-up and roll-back
are right); a different small model is accepted rarely, yet outputs never change."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LoRARequest, SamplingParams
from tests.engine.spec_helpers import make_llm, prompts
from tests.helpers.hf_models import hf_greedy, make_peft_adapter, make_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("spec-draft")
    base = make_tiny_model(root / "base", "llama")
    small = make_tiny_model(root / "small", "llama", seed=3, num_hidden_layers=1)
    adapter = make_peft_adapter(base, root / "a", r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    return base, small, adapter


def draft(model: Path, k: int = 3) -> dict:
    return {
        "method": "draft_model",
        "model": str(model),
        "num_speculative_tokens": k,
        "min_acceptance_rate": 0.0,
    }


def test_the_target_as_its_own_draft_is_always_accepted_on_base_requests(models, one_torch_thread):
    base, _, _ = models
    ps = prompts(4, seed=31)
    expected = [o.outputs[0].token_ids for o in make_llm(base).generate(ps, GREEDY)]
    llm = make_llm(base, draft(base))
    got = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]
    assert got == expected == hf_greedy(base, {}, ps, [None] * 4, 12)
    stats = llm.engine.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    proposer = llm.engine.spec.proposer
    llm.engine.step()  # an idle step: shadows of sequences that left are freed at the next proposal
    assert (
        proposer.shadows == {} and proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks
    )


def test_a_small_draft_with_adapters_prefix_hits_and_preemption_changes_nothing(models, one_torch_thread):
    base, small, adapter = models
    names = ["a", None, "a", None, None]
    lr = [LoRARequest("a", str(adapter)) if n else None for n in names]
    ps = prompts(5, seed=32, lengths=(9, 13))
    ps[4] = [*ps[1][:8], 7]  # shares two blocks with the second prompt
    expected = make_llm(base, num_kv_blocks=14).generate(ps, GREEDY, lora_request=lr)
    llm = make_llm(base, draft(small), num_kv_blocks=14)
    got = llm.generate(ps, GREEDY, lora_request=lr)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(base, {"a": adapter}, ps, names, 12)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.spec.stats.num_draft_tokens > 0


def test_a_draft_with_another_vocabulary_is_refused(models, tmp_path):
    base, _, _ = models
    other = make_tiny_model(tmp_path / "other", "llama", vocab_size=256)
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(base, draft(other))


def test_sequences_longer_than_the_draft_holds_decode_without_drafts(models, tmp_path, one_torch_thread):
    base, _, _ = models
    short = make_tiny_model(tmp_path / "short", "llama", num_hidden_layers=1, max_position_embeddings=16)
    ps = prompts(2, seed=33, lengths=(5, 9))
    expected = [o.outputs[0].token_ids for o in make_llm(base).generate(ps, GREEDY)]
    llm = make_llm(base, draft(short))
    assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == expected
    assert llm.engine.spec.stats.num_drafts > 0  # the short stretch still speculated


def test_the_draft_catches_up_in_chunks_of_the_token_budget(models, one_torch_thread):
    """Prompts longer than the step's token budget: the draft prefills them in several forwards (and the
    target in chunks); the target as its own draft is still accepted whole."""
    base, _, _ = models
    ps = prompts(3, seed=34, lengths=(40, 50, 70))  # 160 tokens to catch up; 64 a forward
    expected = [o.outputs[0].token_ids for o in make_llm(base).generate(ps, GREEDY)]
    llm = make_llm(base, draft(base), max_num_batched_tokens=8)
    calls: list[int] = []
    runner = llm.engine.spec.proposer.runner
    execute = runner.execute

    def record(batch, *args, **kwargs):
        calls.append(sum(n for _, n in batch))
        return execute(batch, *args, **kwargs)

    runner.execute = record
    assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == expected
    stats = llm.engine.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert max(calls) == runner.input.max_tokens == 64  # full chunks
