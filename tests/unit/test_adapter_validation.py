"""Adapter validation against real PEFT adapters saved for small random base models."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.validation import AdapterRejected, load_base_model_spec, validate_adapter
from engine.lora import load_adapter
from engine.model_loader import load_config
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model

MAX_RANK = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": make_tiny_model(root / "llama", "llama"),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2"),
        "mistral": make_tiny_model(root / "mistral", "mistral", num_key_value_heads=1),
        # Same family, other sizes: adapters for these must not fit the llama above.
        "wide": make_tiny_model(root / "wide", "llama", hidden_size=96, num_attention_heads=6, head_dim=16),
        "deep": make_tiny_model(root / "deep", "llama", num_hidden_layers=3),
    }


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory) -> Path:
    return make_peft_adapter(models["llama"], tmp_path_factory.mktemp("a") / "q_v", r=8)


def check(adapter_dir: Path, base_dir: Path, max_rank: int = MAX_RANK):
    return validate_adapter(
        adapter_dir / "adapter_config.json",
        adapter_dir / "adapter_model.safetensors",
        load_base_model_spec(base_dir),
        max_rank,
    )


def refused(adapter_dir: Path, base_dir: Path, max_rank: int = MAX_RANK) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as info:
        check(adapter_dir, base_dir, max_rank)
    assert 400 <= info.value.status_code < 500
    return info.value


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(adapter_dir: Path, edit) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("arch", "r", "targets", "rslora"),
    [
        ("llama", 1, ("q_proj",), False),
        ("llama", 8, ("q_proj", "v_proj"), False),
        ("llama", 16, ALL_TARGETS, True),
        ("llama", 4, ("gate_proj", "up_proj", "down_proj"), False),
        ("qwen2", 4, ("k_proj", "o_proj", "down_proj"), False),
        ("mistral", 8, ("k_proj", "v_proj", "up_proj"), False),
    ],
)
def test_peft_save_pretrained_output_is_accepted_unchanged(models, tmp_path, arch, r, targets, rslora):
    out = make_peft_adapter(
        models[arch], tmp_path / "ad", r=r, target_modules=targets, alpha=32, use_rslora=rslora
    )
    result = check(out, models[arch])
    spec = result.spec
    assert spec.rank == r and spec.alpha == 32.0 and spec.use_rslora is rslora
    assert set(spec.target_modules) == set(targets)
    expected_scale = 32 / math.sqrt(r) if rslora else 32 / r
    assert spec.scaling == pytest.approx(expected_scale)
    assert len(result.layout.tensors) == 2 * 2 * len(targets)  # 2 layers, A and B
    assert spec.warnings == ()
    # Whatever the registry accepts, the engine's loader reads, with the same rank and scale.
    loaded = load_adapter(out, load_config(models[arch]), max_rank=MAX_RANK, expected_hash=None)
    assert loaded.rank == r and loaded.scaling == pytest.approx(expected_scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_are_accepted(adapter, models, tmp_path, dtype):
    out = copy_adapter(adapter, tmp_path / "half")
    edit_tensors(out, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    assert check(out, models["llama"]).spec.rank == 8
    assert load_adapter(out, load_config(models["llama"]), max_rank=MAX_RANK).rank == 8


def test_all_linear_means_the_seven_projections(models, tmp_path):
    out = make_peft_adapter(models["llama"], tmp_path / "all", r=2, target_modules=ALL_TARGETS)
    edit_config(out, target_modules="all-linear")
    assert check(out, models["llama"]).spec.target_modules == ALL_TARGETS
    assert load_adapter(out, load_config(models["llama"]), max_rank=MAX_RANK).rank == 2
    partial = make_peft_adapter(models["llama"], tmp_path / "qv", r=2)
    edit_config(partial, target_modules="all-linear")
    assert refused(partial, models["llama"]).code == "missing_tensor"


def test_unknown_config_keys_are_ignored_with_a_warning(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "extra")
    edit_config(out, my_training_note="lr=1e-4", another_future_option=True)
    warnings = check(out, models["llama"]).spec.warnings
    assert len(warnings) == 2 and any("my_training_note" in w for w in warnings)


# --- refusals of the config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"peft_type": "IA3"}, "unsupported_peft_type"),
        ({"task_type": "SEQ_CLS"}, "unsupported_task_type"),
        ({"r": 0}, "invalid_rank"),
        ({"r": True}, "invalid_rank"),
        ({"r": "8"}, "invalid_rank"),
        ({"lora_alpha": -1}, "invalid_alpha"),
        ({"lora_alpha": "16"}, "invalid_alpha"),
        ({"bias": "all"}, "bias_refused"),
        ({"use_dora": True}, "use_dora_refused"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save_refused"),
        ({"lora_bias": True}, "lora_bias_refused"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out_refused"),
        ({"target_modules": ["q_proj", "lm_head"]}, "unsupported_target_module"),
        ({"target_modules": ["c_attn"]}, "wrong_architecture"),
        ({"target_modules": ".*q_proj"}, "unsupported_target_module"),
        ({"target_modules": []}, "unsupported_target_module"),
        ({"target_modules": ["self_attn.q_proj", "v_proj"]}, "unsupported_target_module"),
        ({"use_rslora": "yes"}, "malformed_config"),
        ({"rank_pattern": ["q_proj"]}, "malformed_config"),
        ({"layers_to_transform": [5]}, "wrong_architecture"),
    ],
)
def test_config_refusals_name_the_reason(adapter, models, tmp_path, changes, code):
    out = copy_adapter(adapter, tmp_path / "bad")
    edit_config(out, **changes)
    err = refused(out, models["llama"])
    assert err.code == code and err.param == "adapter_config"


def test_every_option_that_changes_the_forward_pass_is_refused_by_name(adapter, models, tmp_path):
    from engine.adapter_format import REFUSED_WHEN_ACTIVE as _REFUSED_WHEN_ACTIVE

    active = {"layers_pattern": "layers", "exclude_modules": ["q_proj"], "megatron_config": {"tp": 2}}
    for key in _REFUSED_WHEN_ACTIVE:
        out = copy_adapter(adapter, tmp_path / key)
        edit_config(out, **{key: active.get(key, True)})
        err = refused(out, models["llama"])
        assert (err.code, err.param) == (f"{key}_refused", "adapter_config"), key
    # ...while each one's inactive default, as PEFT writes it, passes.
    out = copy_adapter(adapter, tmp_path / "defaults")
    edit_config(out, **{key: None for key in _REFUSED_WHEN_ACTIVE})
    assert check(out, models["llama"]).spec.warnings == ()


def test_rank_above_the_server_maximum(adapter, models):
    err = refused(adapter, models["llama"], max_rank=4)
    assert err.code == "rank_too_high" and "r=8" in err.message


def test_real_dora_adapter_is_refused(models, tmp_path):
    out = make_peft_adapter(models["llama"], tmp_path / "dora", r=4, use_dora=True)
    assert refused(out, models["llama"]).code == "use_dora_refused"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"{not json",
        b'{"r": 8, "r": 16}',
        pickle.dumps({"r": 8}),
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",
    ],
)
def test_config_that_is_not_a_json_object(adapter, models, tmp_path, raw):
    out = copy_adapter(adapter, tmp_path / "cfg")
    (out / "adapter_config.json").write_bytes(raw)
    err = refused(out, models["llama"])
    assert err.param == "adapter_config"
    assert err.code in ("malformed_config", "pickle_refused")


def test_config_missing_required_keys(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "cfg")
    config = json.loads((out / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    err = refused(out, models["llama"])
    assert err.code == "malformed_config" and "lora_alpha" in err.message


# --- refusals of the weights -----------------------------------------------------------------------


def test_adapter_for_a_wider_model_is_a_shape_mismatch(models, tmp_path):
    out = make_peft_adapter(models["wide"], tmp_path / "wide", r=8)
    err = refused(out, models["llama"])
    assert err.code == "shape_mismatch" and err.param == "weights"


def test_adapter_for_a_deeper_model_names_the_layer(models, tmp_path):
    out = make_peft_adapter(models["deep"], tmp_path / "deep", r=8)
    err = refused(out, models["llama"])
    assert err.code == "wrong_architecture" and "layer 2" in err.message


def test_kv_projections_use_the_gqa_width(models, tmp_path):
    # k/v output is num_kv_heads * head_dim = 32, not hidden = 64: a B of [64, r] must fail.
    out = make_peft_adapter(models["llama"], tmp_path / "kv", r=4, target_modules=("k_proj",))
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    edit_tensors(out, lambda t: t.update({key: torch.zeros(64, 4)}))
    err = refused(out, models["llama"])
    assert err.code == "shape_mismatch" and "[32, 4]" in err.message


def test_config_rank_disagreeing_with_tensors(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "rank")
    edit_config(out, r=4)
    assert refused(out, models["llama"]).code == "shape_mismatch"


def test_missing_tensor(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "missing")
    edit_tensors(out, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    err = refused(out, models["llama"])
    assert err.code == "missing_tensor" and "layers.1.self_attn.v_proj.lora_B" in err.message


def test_config_listing_a_target_the_weights_lack(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "more")
    edit_config(out, target_modules=["q_proj", "v_proj", "o_proj"])
    assert refused(out, models["llama"]).code == "missing_tensor"


@pytest.mark.parametrize(
    "name",
    [
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight",  # not targeted
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",  # wrong parent
        "base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight",  # non-canonical index
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.extra",
    ],
)
def test_extra_tensors_are_refused(adapter, models, tmp_path, name):
    out = copy_adapter(adapter, tmp_path / "extra")
    edit_tensors(out, lambda t: t.update({name: torch.zeros(8, 64)}))
    err = refused(out, models["llama"])
    assert err.code in ("unexpected_tensor", "use_dora_refused")
    assert name[:60] in err.message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_values_are_found_in_every_dtype(adapter, models, tmp_path, bad, dtype):
    out = copy_adapter(adapter, tmp_path / "nan")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(t):
        for k in t:
            t[k] = t[k].to(dtype)
        t[key][5, 3] = bad

    edit_tensors(out, poison)
    err = refused(out, models["llama"])
    assert err.code == "non_finite_values" and key in err.message


def test_int8_weights_are_refused(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "i8")
    edit_tensors(out, lambda t: t.update({k: v.to(torch.int8) for k, v in t.items()}))
    assert refused(out, models["llama"]).code == "dtype_refused"


def test_truncated_weights(adapter, models, tmp_path):
    out = copy_adapter(adapter, tmp_path / "cut")
    path = out / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert refused(out, models["llama"]).code == "truncated_file"


def test_pickle_whose_reduce_writes_a_file_is_never_run(adapter, models, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    for name in ("adapter_model.safetensors", "adapter_config.json"):
        out = copy_adapter(adapter, tmp_path / f"pickle-{name}")
        (out / name).write_bytes(pickle.dumps(Payload()))
        err = refused(out, models["llama"])
        assert err.code == "pickle_refused"
    torch.save({"x": Payload()}, tmp_path / "torch-pickle")
    out = copy_adapter(adapter, tmp_path / "torch")
    shutil.copy(tmp_path / "torch-pickle", out / "adapter_model.safetensors")
    assert refused(out, models["llama"]).code == "archive_refused"
    assert not marker.exists()


def test_adapter_for_another_model_size_is_refused_on_a_qwen2_base(models, tmp_path):
    out = make_peft_adapter(models["wide"], tmp_path / "w", r=4, target_modules=("down_proj",))
    assert refused(out, models["qwen2"]).code == "shape_mismatch"
