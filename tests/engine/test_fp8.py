"""FP8 base weights (docs/quantization.md) against transformers + PEFT on the dequantized weights.

On CPU the FP8 weights are dequantized at every product and activations are not quantized, so the engine
must equal a float model built from the dequantized weights: logits to float32 rounding, greedy tokens
exactly, with adapters (float32, on top) mixed in the batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.quant.checkpoint import parse_scheme
from engine.quant.linear import Fp8Linear
from kernels import fp8
from tests.helpers.fp8_checkpoint import scheme_config, write_dequantized, write_fp8_checkpoint
from tests.helpers.hf_families import loaded_prefill_logits, make_family_model
from tests.helpers.hf_models import (
    ALL_TARGETS,
    hf_greedy,
    hf_logits,
    load_hf,
    make_peft_adapter,
    make_tiny_model,
)

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [
    [0, 17, 99, 240, 31],
    [0, 5, 6, 7, 300, 301, 302, 303, 12],
    [0, 400, 8],
    [0, 44, 45, 46, 47, 48, 49],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread_for_module")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    base = make_tiny_model(root / "float", "llama")
    out = {"float": base}
    for strategy, acts in (("channel", "dynamic"), ("tensor", "static")):
        name = f"{strategy}-{acts}"
        out[name] = write_fp8_checkpoint(base, root / name, strategy, acts)
        out[f"{name}-deq"] = write_dequantized(out[name], root / f"{name}-deq")
    return out


def engine_logits(model_dir: Path, ids: list[int], **config: Any) -> torch.Tensor:
    """Our float32 logits at every position of one sequence, prefilled in one step."""
    return loaded_prefill_logits(
        load_model(EngineConfig(model=str(model_dir), device="cpu", **{"dtype": "float32", **config})), ids
    )


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_quantize_rows_bounds() -> None:
    w = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]
    w[5] = 0.0  # an all-zero row must not divide by zero
    w8, scale = fp8.quantize_rows(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (32,)
    assert w8.float().abs().amax(dim=1)[torch.arange(32) != 5].eq(448).all()  # each row's max hits the top
    back = fp8.dequantize(w8, scale, torch.float32)
    assert torch.equal(back[5], torch.zeros(64))
    # e4m3 keeps 3 mantissa bits: at most 1/16 relative error per element above the subnormals.
    big = w.abs() > scale[:, None] * 2**-6
    assert ((back - w).abs() <= w.abs() / 16 + 1e-30)[big].all()


@pytest.mark.parametrize("scheme", ["channel-dynamic", "tensor-static"])
def test_checkpoint_logits_equal_dequantized_model(models: dict[str, Path], scheme: str) -> None:
    ids = PROMPTS[1]
    ours = engine_logits(models[scheme], ids)
    oracle = hf_logits(load_hf(models[f"{scheme}-deq"]), ids)
    err = relative_error(ours, oracle)
    print(f"{scheme}: relative error of FP8 logits vs the dequantized float model: {err:.2e}")
    assert err < 1e-5
    # And the quantization is real: against the original float model the logits move.
    assert relative_error(ours, hf_logits(load_hf(models["float"]), ids)) > 1e-4


def test_phi4_mini_fused_checkpoint_with_partial_rotary(tmp_path: Path) -> None:
    """Phi-3 stores q/k/v and gate/up fused (one scale vector each); partial rotary reorders the q/k rows
    at load, and their per-channel scales must follow."""
    rope = {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.0, 1.7, 2.4, 3.1],
    }  # fmt: skip
    base = make_family_model(
        tmp_path / "base", "phi3", rope_parameters=rope, partial_rotary_factor=0.5,
        original_max_position_embeddings=16, max_position_embeddings=128,
    )  # fmt: skip
    quantized = write_fp8_checkpoint(base, tmp_path / "fp8", "channel", "dynamic")
    ids = PROMPTS[1] * 3  # past the original context: the long factors
    ours = engine_logits(quantized, ids)
    err = relative_error(ours, hf_logits(load_hf(write_dequantized(quantized, tmp_path / "deq")), ids))
    print(f"phi3 fused + partial rotary: relative error vs the dequantized float model: {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("scheme", ["channel-dynamic", "tensor-static"])
def test_fp8_product_path_in_the_model(models: dict[str, Path], scheme: str) -> None:
    """Fp8Linear's FP8 branch (activations rounded per token or with the static input scale, then
    torch._scaled_mm) inside the whole bf16 model, where this torch runs it on CPU: close to the
    dequantize branch. On a GPU the same branch is chosen at load (tests/engine/test_fp8_gpu.py)."""
    from tests.kernels.test_fp8_kernels import _scaled_mm_runs

    if not _scaled_mm_runs("cpu"):
        pytest.skip("torch._scaled_mm with row-wise scales does not run on this CPU build")
    loaded = load_model(EngineConfig(model=str(models[scheme]), device="cpu", dtype="bfloat16"))
    layers = [m for m in loaded.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 8 and all(m.input_scale is not None for m in layers) == (scheme == "tensor-static")
    dequantized = loaded_prefill_logits(loaded, PROMPTS[1])
    for m in layers:
        m.fp8_gemm = True
    fp8_products = loaded_prefill_logits(loaded, PROMPTS[1])
    err = relative_error(fp8_products, dequantized)
    print(f"{scheme}: FP8 products vs dequantized bf16 products, relative error of the logits {err:.2e}")
    assert 0 < err < 0.1


def test_checkpoint_projections_stay_fp8(models: dict[str, Path]) -> None:
    loaded = load_model(EngineConfig(model=str(models["channel-dynamic"]), device="cpu", dtype="float32"))
    assert loaded.quantization == "fp8"
    layer = loaded.model.layers[0]
    for proj in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        assert isinstance(proj, Fp8Linear) and proj.weight.dtype == torch.float8_e4m3fn
        assert not proj.fp8_gemm  # CPU: dequantize path
    assert loaded.model.lm_head.weight.dtype == torch.float32  # the ignore list's lm_head


def test_quantize_at_load_equals_channel_checkpoint(models: dict[str, Path]) -> None:
    """quantization="fp8" on the float checkpoint = the per-channel FP8 checkpoint of the same weights."""
    ids = PROMPTS[0]
    at_load = engine_logits(models["float"], ids, quantization="fp8")
    err = relative_error(at_load, hf_logits(load_hf(models["channel-dynamic-deq"]), ids))
    print(f"quantized at load: relative error vs the dequantized float model: {err:.2e}")
    assert err < 1e-5
    plain = load_model(EngineConfig(model=str(models["float"]), device="cpu", dtype="float32"))
    assert plain.quantization is None and isinstance(plain.model.layers[0].mlp.down_proj, torch.nn.Linear)


@pytest.mark.slow
def test_greedy_tokens_equal_hf_peft_mixed_adapters(models: dict[str, Path], tmp_path: Path) -> None:
    """Two adapters (fp32, on the FP8 base) and base rows in one batch; chunked prefill and a prefix hit."""
    deq = models["channel-dynamic-deq"]
    adapters = {
        "all": make_peft_adapter(deq, tmp_path / "all", r=4, target_modules=ALL_TARGETS, seed=1),
        "qv": make_peft_adapter(deq, tmp_path / "qv", r=8, target_modules=("q_proj", "v_proj"), seed=2),
    }
    names: list[str | None] = ["all", "qv", None, "all"]
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    expected = hf_greedy(deq, adapters, PROMPTS, names, GREEDY.max_tokens)
    for model, extra in ((models["channel-dynamic"], {}), (models["float"], {"quantization": "fp8"})):
        llm = LLM(
            str(model), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
            max_lora_rank=8, max_num_batched_tokens=8, **extra,
        )  # fmt: skip
        for _ in range(2):  # the second pass hits the prefix cache
            outs = llm.generate(PROMPTS, GREEDY, lora_request=loras)
            assert [o.outputs[0].token_ids for o in outs] == expected
    # The adapters change the output (else a dropped LoRA path could pass).
    assert expected != hf_greedy(deq, {}, PROMPTS, [None] * len(PROMPTS), GREEDY.max_tokens)


def test_scheme_parsing() -> None:
    assert parse_scheme({}) is None
    s = parse_scheme({"quantization_config": scheme_config("channel", "dynamic")})
    assert s is not None and (s.weight_strategy, s.activations, s.ignore) == (
        "channel",
        "dynamic",
        ("lm_head",),
    )
    s = parse_scheme({"quantization_config": scheme_config("tensor", "static")})
    assert s is not None and (s.weight_strategy, s.activations) == ("tensor", "static")
    s = parse_scheme({"quantization_config": scheme_config("channel", "none")})
    assert s is not None and s.activations == "none"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quant_method": "awq"}, "quant_method"),
        ({"format": "pack-quantized"}, "format"),
        ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
        ({"weights": {"num_bits": 4}}, "weights"),
        ({"weights": {"strategy": "group", "group_size": 128}}, "weights"),
        ({"input_activations": {"dynamic": False, "strategy": "token"}}, "input_activations"),
    ],
)
def test_scheme_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    qc = scheme_config("channel", "dynamic")
    group = qc["config_groups"]["group_0"]
    for key, value in change.items():
        if key in group:
            assert isinstance(value, dict)
            group[key] = {**group[key], **value}
        else:
            qc[key] = value
    with pytest.raises(ValueError, match=field):
        parse_scheme({"quantization_config": qc})


def test_bad_configuration_errors(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model="x", quantization="int8")
    # A fused projection with only some parts quantized cannot be fused at load.
    bad = tmp_path / "bad"
    bad.mkdir()
    src = models["channel-dynamic"]
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj"
    tensors[f"{name}.weight"] = tensors[f"{name}.weight"].float() * tensors.pop(f"{name}.weight_scale")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="all quantized or none"):
        load_model(EngineConfig(model=str(bad), device="cpu", dtype="float32"))
    # A scale for a float weight.
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].float()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="not stored in float8"):
        load_model(EngineConfig(model=str(bad), device="cpu", dtype="float32"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method"):
        LLM(str(bad), device="cpu", dtype="float32")


def test_settings_from_the_environment() -> None:
    from app.config import Settings, SettingsError

    env = {"LORAPLEX_MODEL": "/m", "LORAPLEX_QUANTIZATION": "fp8", "LORAPLEX_DETERMINISTIC": "true"}
    config = Settings.from_env(env).engine_config()
    assert config is not None and (config.quantization, config.deterministic) == ("fp8", True)
    config = Settings.from_env({"LORAPLEX_MODEL": "/m"}).engine_config()
    assert config is not None and (config.quantization, config.deterministic) == (None, False)
    with pytest.raises(SettingsError, match="LORAPLEX_QUANTIZATION"):
        Settings.from_env({**env, "LORAPLEX_QUANTIZATION": "int4"})


def test_static_input_scales_of_fused_parts(models: dict[str, Path], tmp_path: Path) -> None:
    """q, k and v feed one fused product: its static input scale is the largest of theirs; a static
    scheme without an input_scale is refused."""
    from safetensors.torch import load_file, save_file

    src = models["tensor-static"]
    bad = tmp_path / "m"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    prefix = "model.layers.1.self_attn"
    for part, value in (("q_proj", 0.01), ("k_proj", 0.07), ("v_proj", 0.03)):
        tensors[f"{prefix}.{part}.input_scale"] = torch.tensor([value])
    save_file(tensors, str(bad / "model.safetensors"))
    loaded = load_model(EngineConfig(model=str(bad), device="cpu", dtype="float32"))
    qkv = loaded.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.input_scale is not None
    assert torch.equal(qkv.input_scale, torch.tensor([0.07]))
    del tensors[f"{prefix}.k_proj.input_scale"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="no input_scale"):
        load_model(EngineConfig(model=str(bad), device="cpu", dtype="float32"))
