"""The adapter-format contract per served family (engine/adapter_format.py, which upload validation
runs too): the targets each architecture allows, PEFT's tensor names for them, and the reason given when
an adapter was trained for another family."""

from __future__ import annotations

import pytest

from engine.adapter_format import (
    TARGET_MODULES,
    AdapterError,
    check_lora_config,
    module_dims,
    module_path,
    parse_tensor_name,
)
from engine.models import MODEL_REGISTRY


def config(targets):
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": targets}


def test_every_registered_family_has_its_targets_in_the_contract():
    assert {f.model_type for f in MODEL_REGISTRY.values()} == set(TARGET_MODULES)


@pytest.mark.parametrize("model_type", list(TARGET_MODULES))
def test_all_linear_is_the_family_s_projections(model_type):
    spec = check_lora_config(config("all-linear"), 16, model_type, 2)
    assert spec.target_modules == TARGET_MODULES[model_type]


def test_fused_names_parse_and_have_fused_shapes():
    name = "base_model.model.model.layers.3.self_attn.qkv_proj.lora_B.weight"
    assert parse_tensor_name(name, 4) == (3, "qkv_proj", "B")
    assert parse_tensor_name(name.replace("self_attn.qkv", "mlp.gate_up"), 4) == (3, "gate_up_proj", "B")
    with pytest.raises(AdapterError, match="puts qkv_proj under mlp"):
        parse_tensor_name(name.replace("self_attn", "mlp"), 4)
    assert module_path(0, "qkv_proj") == "model.layers.0.self_attn.qkv_proj"
    assert module_dims("qkv_proj", 64, 64, 32, 96) == (64, 128)
    assert module_dims("gate_up_proj", 64, 64, 32, 96) == (64, 192)


@pytest.mark.parametrize(
    ("model_type", "target", "reason"),
    [
        ("phi3", "q_proj", "Phi-3 fuses it into qkv_proj"),
        ("phi3", "gate_proj", "Phi-3 fuses it into gate_up_proj"),
        ("qwen3", "qkv_proj", "a fused qkv_proj is Phi-3's"),
        ("gemma2", "gate_up_proj", "a fused gate_up_proj is Phi-3's"),
        ("llama", "c_attn", "not a projection of this llama"),
    ],
)
def test_a_target_of_another_family_is_refused_with_the_reason(model_type, target, reason):
    with pytest.raises(AdapterError, match=reason) as err:
        check_lora_config(config([target]), 16, model_type, 2)
    assert err.value.code == "wrong_architecture" and err.value.field == "adapter_config"
