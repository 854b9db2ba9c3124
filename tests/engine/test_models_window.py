"""Sliding-window attention for real: a Mistral-style model with `sliding_window: 24` answers a 105-token
prompt exactly as transformers does (the context used to be capped at the window), with adapters,
chunked prefill, preemption and prefix-cache hits; Qwen2's per-layer windows likewise."""

from __future__ import annotations

import json

import torch

from engine.model_loader import load_config
from tests.helpers.hf_families import check_family, make_family_model, prefill_logits
from tests.helpers.hf_models import ALL_TARGETS, hf_logits, load_hf, make_peft_adapter


def test_mistral_window_24_answers_a_105_token_prompt_like_transformers(tmp_path, one_torch_thread):
    base = make_family_model(
        tmp_path / "base",
        "mistral",
        sliding_window=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
    )
    cfg = load_config(base)
    assert cfg.max_position_embeddings == 512 and cfg.window_of(0) == cfg.window_of(1) == 24
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=4, target_modules=("v_proj", "gate_proj"), seed=2),
    }
    check_family(base, adapters, lengths=(105, 40, 67))


def test_the_window_matters_positive_control(tmp_path, one_torch_thread):
    """Our logits equal transformers' with the window, and the window changes them: past 24 tokens a
    full-attention model (the same weights) answers differently."""
    base = make_family_model(tmp_path / "base", "mistral", sliding_window=24)
    ids = [0, *range(30, 134)]  # 105 tokens
    ours = prefill_logits(base, ids)
    torch.testing.assert_close(ours, hf_logits(load_hf(base), ids), atol=2e-4, rtol=0)
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(raw | {"sliding_window": None}))
    full = prefill_logits(base, ids)
    assert (full[:24] - ours[:24]).abs().max() < 1e-5  # inside the window: the same
    assert (full[30:] - ours[30:]).abs().max() > 1e-2


def test_qwen2_window_on_the_upper_layers_only(tmp_path, one_torch_thread):
    base = make_family_model(
        tmp_path / "base", "qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
        max_window_layers=2,
    )  # fmt: skip
    cfg = load_config(base)
    assert [cfg.window_of(i) for i in range(3)] == [None, None, 8]
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=2, target_modules=("q_proj", "o_proj"), seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=16, target_modules=ALL_TARGETS, seed=2),
    }
    check_family(base, adapters, lengths=(19, 33))
