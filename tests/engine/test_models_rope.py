"""Every rope type the served families ship, and tied embeddings, against transformers: logits at every
position of a prompt longer than the original context (where the scalings differ), plus greedy tokens
with adapters for the tied Llama 3.2-style model."""

from __future__ import annotations

import pytest
import torch

from engine.model_loader import load_config
from tests.helpers.hf_families import check_family, make_family_model, prefill_logits
from tests.helpers.hf_models import ALL_TARGETS, LLAMA3_ROPE, hf_logits, load_hf, make_peft_adapter

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
HALF = 8  # head_dim 16 / 2: LongRoPE has one factor per rotated pair
LONGROPE = {
    "rope_type": "longrope", "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.1 * i for i in range(HALF)], "long_factor": [1.0 + 0.7 * i for i in range(HALF)],
    "original_max_position_embeddings": 32,
}  # fmt: skip

# Phi3Config keeps its own top-level original_max_position_embeddings (4096) over the rope dict's.
PHI3_32 = {"original_max_position_embeddings": 32}

ROPES = {
    "llama-default": ("llama", {}),
    "llama-linear": (
        "llama",
        {"rope_scaling": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "llama3-tied": ("llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "llama-yarn": ("llama", {"rope_scaling": YARN}),
    "qwen2-yarn-tied": ("qwen2", {"rope_scaling": YARN, "tie_word_embeddings": True}),
    "llama-yarn-mscale": ("llama", {"rope_scaling": {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0}}),
    "phi3-longrope-long": ("phi3", {"rope_scaling": LONGROPE, "max_position_embeddings": 128, **PHI3_32}),
    "phi3-su-short": (
        "phi3",
        {"rope_scaling": {**LONGROPE, "rope_type": "su"}, "max_position_embeddings": 32, **PHI3_32},
    ),
}


@pytest.mark.parametrize("case", list(ROPES))
def test_rope_type_logits_match_transformers(tmp_path, case, one_torch_thread):
    arch, overrides = ROPES[case]
    base = make_family_model(tmp_path / "m", arch, **overrides)
    cfg = load_config(base)
    assert cfg.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    # Past the original 32 positions when the served context allows it: the long factors / the ramp.
    ids = [0, *range(40, 40 + min(cfg.max_position_embeddings, 60) - 1)]
    torch.testing.assert_close(prefill_logits(base, ids), hf_logits(load_hf(base), ids), atol=2e-4, rtol=0)


def test_rope_scaling_changes_the_logits(tmp_path, one_torch_thread):
    """Positive control: the yarn model's logits are not those of the same weights with plain rope."""
    plain = make_family_model(tmp_path / "plain", "llama")
    yarn = make_family_model(tmp_path / "yarn", "llama", rope_scaling=YARN)
    ids = [0, *range(40, 99)]
    assert (prefill_logits(plain, ids) - prefill_logits(yarn, ids)).abs().max() > 1e-2


def test_tied_llama32_style_with_adapters(tmp_path, one_torch_thread):
    base = make_family_model(tmp_path / "base", "llama", rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=4, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=16, target_modules=("q_proj", "up_proj"), seed=2),
    }
    check_family(base, adapters, lengths=(9, 14, 21))
