"""Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj in the checkpoint and in PEFT's adapters) against
transformers + PEFT, token for token; adapters for the fused modules are split per projection at load."""

from __future__ import annotations

import pytest

from engine.adapter_format import AdapterError
from engine.lora import load_adapter
from engine.model_loader import load_config, parse_config
from tests.helpers.hf_families import check_family, make_family_model, make_partial_rotary_phi3
from tests.helpers.hf_models import make_peft_adapter

FUSED_ALL = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_phi3_with_fused_adapters_and_a_window(tmp_path, one_torch_thread):
    base = make_family_model(tmp_path / "base", "phi3", sliding_window=12, num_key_value_heads=2)
    cfg = load_config(base)
    assert cfg.model_type == "phi3" and cfg.window_of(0) == 12
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=FUSED_ALL, seed=1),
        "b": make_peft_adapter(
            base, tmp_path / "b", r=4, target_modules=("qkv_proj",), seed=2, rank_pattern={"qkv_proj": 2}
        ),
    }
    split = load_adapter(adapters["a"], cfg, max_rank=16)
    assert set(split.a) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (split.a["q_proj"] == split.a["v_proj"]).all()  # one A, B cut by rows
    assert split.b["k_proj"].shape == (cfg.num_layers, cfg.kv_size, 8)
    assert load_adapter(adapters["b"], cfg, max_rank=16).rank == 2
    check_family(base, adapters, lengths=(15, 22, 29))


def test_adapters_that_do_not_fit_phi3_are_refused_by_name(tmp_path, one_torch_thread):
    base = make_family_model(tmp_path / "base", "phi3")
    llama = make_family_model(tmp_path / "llama", "llama")
    per_projection = make_peft_adapter(llama, tmp_path / "llama-a", r=4, target_modules=("q_proj", "up_proj"))
    with pytest.raises(
        AdapterError, match=r"(q_proj|up_proj).*Phi-3 fuses it into (qkv_proj|gate_up_proj)"
    ) as err:
        load_adapter(per_projection, load_config(base), max_rank=16)
    assert err.value.code == "wrong_architecture"
    fused = make_peft_adapter(base, tmp_path / "phi-a", r=4, target_modules=("gate_up_proj",))
    with pytest.raises(AdapterError, match=r"gate_up_proj is Phi-3's") as err:
        load_adapter(fused, load_config(llama), max_rank=16)
    assert err.value.code == "wrong_architecture"


def test_phi4_mini_partial_rotary_with_fused_adapters(tmp_path, one_torch_thread):
    """Phi-4-mini rotates 3/4 of each head; here half (head_dim 16 -> 8 rotating dims), LongRoPE factors
    for those only, past the original context."""
    base = make_partial_rotary_phi3(tmp_path / "base")
    cfg = load_config(base)
    assert cfg.rotary_dim == 8 and cfg.head_dim == 16
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=FUSED_ALL, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=2, target_modules=("qkv_proj",), seed=2),
    }
    check_family(base, adapters, lengths=(18, 25))


def test_bad_partial_rotary_is_refused():
    raw = {
        "architectures": ["Phi3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "partial_rotary_factor": 0.1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        parse_config(raw)  # 16 * 0.1 = 1 rotating dim: odd
