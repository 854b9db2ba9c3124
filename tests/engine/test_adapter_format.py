"""One adapter-format contract (engine/adapter_format.py): upload validation and the engine's loader accept
and refuse the same adapters, for the same reason, including PEFT's rank_pattern / alpha_pattern."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.validation import AdapterRejected, load_base_model_spec, validate_adapter
from engine import AsyncLLMEngine, EngineConfig, LoRARequest, RequestFailedError, SamplingParams
from engine.adapter_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from engine.lora import load_adapter
from engine.model_loader import load_config
from tests.helpers.hf_models import ALL_TARGETS, hf_greedy, make_peft_adapter, make_tiny_model

MAX_RANK = 16
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fmt") / "base", "llama")


@pytest.fixture(scope="module")
def patterned(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT save_pretrained output with per-module ranks and alphas, as PEFT writes them."""
    return make_peft_adapter(
        base,
        tmp_path_factory.mktemp("fmt") / "patterned",
        r=8,
        alpha=16,
        target_modules=ALL_TARGETS,
        rank_pattern={"o_proj": 2, "model.layers.1.mlp.down_proj": 4},
        alpha_pattern={"gate_proj": 64, "v_proj": 4},
    )


def upload_check(folder: Path, base: Path):
    return validate_adapter(folder / CONFIG_FILE, folder / WEIGHTS_FILE, load_base_model_spec(base), MAX_RANK)


def test_peft_rank_and_alpha_patterns_upload_and_load_with_the_same_ranks_and_scales(base, patterned):
    saved = json.loads((patterned / CONFIG_FILE).read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]  # PEFT really wrote them
    spec = upload_check(patterned, base).spec
    loaded = load_adapter(patterned, load_config(base), MAX_RANK)
    raw = load_file(str(patterned / WEIGHTS_FILE))
    for layer in range(2):
        for module in ALL_TARGETS:
            rank = spec.rank_of(layer, module)
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}"
            a = raw[f"{prefix}.{module}.lora_A.weight"]
            assert a.shape[0] == rank, (layer, module)
            assert torch.equal(loaded.a[module][layer, :rank], a)
            # Each module's own scale, relative to the adapter's, is folded into its B.
            b = raw[f"{prefix}.{module}.lora_B.weight"]
            ratio = spec.scaling_of(layer, module) / spec.scaling
            torch.testing.assert_close(loaded.b[module][layer, :, :rank], b * ratio)
    assert (
        spec.rank_of(0, "o_proj") == 2
        and spec.rank_of(1, "down_proj") == 4
        and spec.rank_of(0, "down_proj") == 8
    )
    assert spec.scaling_of(0, "gate_proj") == pytest.approx(64 / 8) and spec.scaling_of(0, "o_proj") == 16 / 2
    assert loaded.scaling == pytest.approx(spec.scaling) == 2.0


@pytest.mark.slow
def test_patterned_adapter_served_by_the_engine_equals_peft(base, patterned):
    from engine import LLM

    llm = LLM(
        model=str(base), device="cpu", dtype="float32", max_loras=1, max_cpu_loras=1, max_lora_rank=MAX_RANK
    )
    prompts = [[0, 5, 6, 7], [0, 9, 3]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=[LoRARequest("p", str(patterned))] * 2)
    expected = hf_greedy(base, {"p": patterned}, prompts, ["p", "p"], max_new_tokens=6)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


BAD_VALUES = [
    # (adapter_config change, code): refused alike at upload and at load.
    ({"lora_alpha": 1e308}, "invalid_alpha"),
    ({"lora_alpha": 10**400}, "invalid_alpha"),
    ({"lora_alpha": float("inf")}, "malformed_config"),  # json.dumps writes Infinity, which is not JSON
    ({"lora_alpha": float("nan")}, "malformed_config"),
    ({"lora_alpha": 0}, "invalid_alpha"),
    ({"lora_alpha": 1e-9}, "invalid_scaling"),
    ({"r": 10**400}, "rank_too_high"),
    ({"r": 8.0}, "invalid_rank"),
    ({"rank_pattern": {"q_proj": 0}}, "invalid_rank"),
    ({"rank_pattern": {"q_proj": 10**400}}, "rank_too_high"),
    ({"rank_pattern": {"q_proj": True}}, "invalid_rank"),
    ({"alpha_pattern": {"q_proj": 1e308}}, "invalid_alpha"),
    ({"alpha_pattern": {"q_proj": -1}}, "invalid_alpha"),
    ({"alpha_pattern": {"q_proj": 1e-9}}, "invalid_scaling"),
    ({"alpha_pattern": {"(a+)+$": 8}}, "unsupported_pattern"),  # a regular expression, not a module path
    ({"rank_pattern": ["q_proj"]}, "malformed_config"),
    ({"layers_to_transform": [0, 0]}, "malformed_config"),
]


@pytest.mark.parametrize(("changes", "code"), BAD_VALUES)
def test_bad_values_are_refused_at_upload_and_at_load_for_the_same_reason(
    base, patterned, tmp_path, changes, code
):
    folder = tmp_path / "bad"
    shutil.copytree(patterned, folder)
    config = json.loads((folder / CONFIG_FILE).read_text()) | changes
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterRejected) as upload:
        upload_check(folder, base)
    assert (upload.value.code, upload.value.param, upload.value.status_code) == (code, "adapter_config", 422)
    field = next(iter(changes))
    assert field in upload.value.message  # the message names the field at fault
    with pytest.raises(AdapterError) as load:
        load_adapter(folder, load_config(base), MAX_RANK)
    assert load.value.code == code


def test_layers_to_transform_uploads_and_loads(base, tmp_path):
    folder = make_peft_adapter(
        base, tmp_path / "l1", r=4, target_modules=("v_proj",), layers_to_transform=[1]
    )
    assert upload_check(folder, base).spec.layers == (1,)
    loaded = load_adapter(folder, load_config(base), MAX_RANK)
    assert torch.count_nonzero(loaded.a["v_proj"][0]) == 0 and torch.count_nonzero(loaded.a["v_proj"][1]) > 0


async def test_an_adapter_with_a_bad_value_fails_only_its_request(base, patterned, tmp_path):
    # Its own weights: the engine caches adapters by the weights' sha256.
    folder = make_peft_adapter(base, tmp_path / "huge-alpha", r=4, seed=1)
    config = json.loads((folder / CONFIG_FILE).read_text()) | {"lora_alpha": 1e308}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_lora_rank=MAX_RANK
    )
    engine = AsyncLLMEngine.from_config(config)
    engine.start()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    try:
        with pytest.raises(RequestFailedError, match="could not be loaded"):
            async for _ in engine.generate("bad", [0, 5], params, lora=LoRARequest("bad", str(folder))):
                pass
        assert engine.is_healthy
        outs = [
            o async for o in engine.generate("good", [0, 5], params, lora=LoRARequest("p", str(patterned)))
        ]
        assert outs[-1].finished
    finally:
        await engine.shutdown()


def test_the_contract_imports_without_torch_or_numpy():
    # The app (which never imports torch) runs these modules; the engine package's __init__ is bypassed
    # so that only the two modules themselves are tested.
    script = textwrap.dedent(
        f"""
        import sys, types
        sys.modules["torch"] = None
        sys.modules["numpy"] = None
        package = types.ModuleType("engine")
        package.__path__ = [{str(REPO / "engine")!r}]
        sys.modules["engine"] = package
        import engine.adapter_format, engine.safetensors_header
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_scaling_range_bounds_every_module_of_a_pattern():
    from engine.adapter_format import SCALING_RANGE, check_lora_config

    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj"]}
    spec = check_lora_config(base | {"rank_pattern": {"o_proj": 1}, "alpha_pattern": {"q_proj": 32}}, 16)
    assert spec.scaling_of(0, "o_proj") == 16.0 and spec.scaling_of(0, "q_proj") == 4.0
    assert SCALING_RANGE[0] <= spec.scaling <= SCALING_RANGE[1]
    # Each value alone is fine, but q_proj's alpha on a rank-16 module (o_proj's key could match it too)
    # gives a scale of 0.001/16, below the range: refused, naming the field.
    with pytest.raises(AdapterError) as info:
        check_lora_config(base | {"rank_pattern": {"o_proj": 16}, "alpha_pattern": {"q_proj": 0.001}}, 16)
    assert info.value.code == "invalid_scaling" and "alpha_pattern" in str(info.value)
    assert info.value.field == "adapter_config"
