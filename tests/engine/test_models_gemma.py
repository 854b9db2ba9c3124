"""Gemma 2 (attention and final logit soft-capping, alternating local/global layers) and Gemma 3 text
(q/k norm, local layers with their own rope base, global ones with linear scaling) against transformers
+ PEFT, token for token. Both: scaled embeddings, (1 + w) norms, four norms per layer, GELU (tanh)."""

from __future__ import annotations

import torch

from engine.model_loader import load_config
from tests.helpers.hf_families import check_family, make_family_model, prefill_logits
from tests.helpers.hf_models import ALL_TARGETS, hf_logits, load_hf, make_peft_adapter

GEMMA = {
    "num_hidden_layers": 3,
    "sliding_window": 6,
    "query_pre_attn_scalar": 24,  # not head_dim: the scale must come from it
    "hidden_activation": "gelu_pytorch_tanh",
}


def _adapters(base, tmp_path):
    return {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(
            base, tmp_path / "b", r=2, target_modules=("q_proj", "v_proj", "down_proj"), seed=2
        ),
    }


def test_gemma2(tmp_path, one_torch_thread):
    # Small caps so that they bite on the tiny model's scores and logits.
    base = make_family_model(
        tmp_path / "base", "gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **GEMMA
    )
    cfg = load_config(base)
    assert [cfg.window_of(i) for i in range(3)] == [6, None, 6] and cfg.tie_word_embeddings
    assert cfg.attn_logit_softcap == 2.0 and cfg.final_logit_softcap == 3.0 and cfg.sandwich_norm
    ids = [0, *range(50, 80)]
    torch.testing.assert_close(prefill_logits(base, ids), hf_logits(load_hf(base), ids), atol=2e-4, rtol=0)
    check_family(base, _adapters(base, tmp_path), lengths=(13, 20, 27))


def test_gemma3_text(tmp_path, one_torch_thread):
    rope = {
        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    base = make_family_model(tmp_path / "base", "gemma3", rope_parameters=rope, layer_types=types, **GEMMA)
    cfg = load_config(base)
    assert cfg.qk_norm and cfg.local_rope == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg.rope_of(1)["rope_type"] == "linear" and [cfg.window_of(i) for i in range(3)] == [6, None, 6]
    ids = [0, *range(50, 80)]
    torch.testing.assert_close(prefill_logits(base, ids), hf_logits(load_hf(base), ids), atol=2e-4, rtol=0)
    check_family(base, _adapters(base, tmp_path), lengths=(13, 20, 27))


def test_older_gemma_configs_without_layer_types_or_rope_parameters():
    """Folders saved before transformers 5: the alternation from the pattern, Gemma 3's local base from
    rope_local_base_freq, its global scaling from rope_scaling."""
    from engine.model_loader import parse_config

    common = {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 7,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 512,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16,
    }  # fmt: skip
    g2 = parse_config(
        common
        | {"architectures": ["Gemma2ForCausalLM"], "hidden_act": "gelu_pytorch_tanh", "rope_theta": 10000.0}
    )
    assert [g2.window_of(i) for i in range(7)] == [512, None] * 3 + [512]
    g3 = parse_config(
        common | {
            "architectures": ["Gemma3ForCausalLM"], "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 6,
        }
    )  # fmt: skip
    assert [g3.window_of(i) for i in range(7)] == [512] * 5 + [None, 512]
    assert g3.rope_of(5) == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert g3.rope_of(0) == {"rope_type": "default", "rope_theta": 10000.0}
    assert g3.tie_word_embeddings and g3.norm_offset == 1.0 and g3.qk_norm and g3.attn_logit_softcap is None
