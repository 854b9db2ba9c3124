"""Every model family of the engine with speculation: greedy tokens equal transformers + PEFT on a batch
mixing two adapters with base rows, cut by chunked prefill and preemptions, then again with the prompts in
the prefix cache; drafts accepted in part (a scripted proposer, right or wrong at known places)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LoRARequest
from tests.engine.spec_helpers import ScriptedProposer
from tests.helpers.hf_families import GREEDY, make_family_model, make_llm, prompts
from tests.helpers.hf_models import ALL_TARGETS, hf_greedy, make_peft_adapter

GEMMA = {"num_hidden_layers": 3, "sliding_window": 6, "query_pre_attn_scalar": 24,
         "hidden_activation": "gelu_pytorch_tanh"}  # fmt: skip
FAMILIES = {
    "mistral": ({"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8}, ALL_TARGETS),
    "qwen2": ({}, ALL_TARGETS),
    "qwen3": (
        {
            "num_hidden_layers": 3,
            "use_sliding_window": True,
            "sliding_window": 6,
            "max_window_layers": 1,
            "tie_word_embeddings": True,
        },
        ALL_TARGETS,
    ),
    "gemma2": ({**GEMMA, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}, ALL_TARGETS),
    "gemma3": (
        {**GEMMA, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        ALL_TARGETS,
    ),
    "phi3": (
        {"sliding_window": 12, "num_key_value_heads": 2},
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
}
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "min_acceptance_rate": 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_with_speculation_equals_hf(arch: str, tmp_path: Path, one_torch_thread) -> None:
    overrides, targets = FAMILIES[arch]
    base = make_family_model(tmp_path / "base", arch, **overrides)
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=targets, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=2, target_modules=targets[-2:], seed=2),
    }
    names: list[str | None] = ["a", "b", None] * 2
    ps = prompts(len(names), 0, (11, 17, 23))
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    expected = hf_greedy(base, adapters, ps, names, 8)
    conts = {(tuple(p), n, 0): t for p, n, t in zip(ps, names, expected, strict=True)}
    blocks = -(-(max(len(p) for p in ps) + 8 + 3) // 4) + 4  # the longest request fits; the batch does not
    llm = make_llm(base, num_kv_blocks=blocks, max_num_batched_tokens=16, speculative_config=SPEC)
    llm.engine.spec.proposer = ScriptedProposer(conts, wrong_every=2)
    outs = llm.generate(ps, GREEDY, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine.spec.stats
    assert llm.engine.scheduler.num_preemptions > 0
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    again = make_llm(base, max_num_batched_tokens=16, speculative_config=SPEC)
    again.engine.spec.proposer = ScriptedProposer(conts, wrong_every=3)
    again.generate(ps, GREEDY, lora_request=loras)
    hit = again.generate(ps, GREEDY, lora_request=loras)
    assert [o.outputs[0].token_ids for o in hit] == expected
    assert all(o.num_cached_tokens > 0 for o in hit)
