"""Model loading: sharded and single-file weights, tied embeddings, dtypes, refusals, KV sizing, dispatch."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.model_loader import load_config, load_model, parse_config, resolve_device, weight_files
from engine.model_runner import CPU_KV_CACHE_BYTES, decide_num_kv_blocks, kv_block_bytes
from engine.ops import get_ops
from tests.helpers.hf_families import loaded_prefill_logits
from tests.helpers.hf_models import hf_logits, load_hf, make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "single": make_tiny_model(root / "single", "llama", seed=7),
        "sharded": make_tiny_model(root / "sharded", "llama", seed=7, sharded=True),
        "tied": make_tiny_model(root / "tied", "qwen2", tie_word_embeddings=True),
    }


def load(path: Path, dtype: str = "float32"):
    return load_model(EngineConfig(model=str(path), device="cpu", dtype=dtype))


def test_sharded_and_single_file_load_the_same_weights(models: dict[str, Path]) -> None:
    assert len(weight_files(models["sharded"])) > 1
    assert len(weight_files(models["single"])) == 1
    single = load(models["single"]).model.state_dict()
    sharded = load(models["sharded"]).model.state_dict()
    assert single.keys() == sharded.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name


def test_tied_embeddings_use_the_embedding_matrix(models: dict[str, Path]) -> None:
    loaded = load(models["tied"])
    assert loaded.config.tie_word_embeddings and loaded.config.qkv_bias
    assert loaded.model.lm_head is None
    hidden = torch.randn(2, loaded.config.hidden_size)
    expected = hidden @ loaded.model.embed_tokens.weight.T
    torch.testing.assert_close(loaded.model.compute_logits(hidden), expected)


def test_half_precision_dtypes(models: dict[str, Path]) -> None:
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        loaded = load(models["single"], name)
        assert loaded.dtype == dtype
        assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="x", dtype="float64")


def test_tokenizer_and_eos_ids(models: dict[str, Path]) -> None:
    loaded = load(models["single"])
    ids = loaded.tokenizer.encode("Hello world")
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"
    assert 3 in loaded.eos_token_ids
    assert loaded.name == "single"


def test_generation_config_eos_ids_are_merged(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((models["single"] / "config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    assert load_config(folder).eos_token_ids == (3, 7)


def _raw(models: dict[str, Path]) -> dict:
    return json.loads((models["single"] / "config.json").read_text())


def test_unsupported_architecture_is_refused_by_name(models: dict[str, Path]) -> None:
    raw = _raw(models) | {"architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        parse_config(raw)
    with pytest.raises(ValueError, match="dynamic"):
        parse_config(_raw(models) | {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):  # yarn needs it
        parse_config(_raw(models) | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="gelu"):
        parse_config(_raw(models) | {"hidden_act": "gelu"})
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_config(models["single"].parent / "nowhere")


def test_older_rope_scaling_key_is_read(models: dict[str, Path]) -> None:
    raw = _raw(models)
    raw.pop("rope_parameters", None)
    raw |= {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = parse_config(raw)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}


def test_pickle_weights_are_refused_and_never_unpickled(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((models["single"] / "config.json").read_text())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="safetensors"):
        load(folder)
    assert not marker.exists()


def test_index_cannot_point_outside_the_folder(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../outside.safetensors"}})
    )
    (tmp_path / "outside.safetensors").write_bytes((models["single"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="bad or missing shard"):
        weight_files(folder)


def test_checkpoint_that_does_not_fit_the_config_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    raw = _raw(models) | {"num_hidden_layers": 3}  # weights have 2 layers
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").write_bytes((models["single"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="missing"):
        load(folder)
    raw = _raw(models) | {"num_hidden_layers": 1}  # weights have an extra layer
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unexpected"):
        load(folder)


def test_kv_cache_sizing(models: dict[str, Path]) -> None:
    loaded = load(models["single"])
    per_block = kv_block_bytes(loaded.config, 16, torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, tokens, kv heads, head dim, fp32
    base = {"model": str(models["single"]), "device": "cpu", "dtype": "float32"}
    assert decide_num_kv_blocks(EngineConfig(**base, num_kv_blocks=5), loaded, None) == 5
    assert decide_num_kv_blocks(EngineConfig(**base, kv_cache_bytes=10 * per_block + 1), loaded, None) == 10
    assert decide_num_kv_blocks(EngineConfig(**base), loaded, None) == CPU_KV_CACHE_BYTES // per_block
    gib = 1 << 30
    # GPU: 40 of 80 GiB free, fraction 0.9 -> 40 - 8 GiB minus the activation reserve.
    gpu = decide_num_kv_blocks(EngineConfig(**base, gpu_memory_fraction=0.9), loaded, (40 * gib, 80 * gib))
    assert 31 * gib // per_block < gpu < 32 * gib // per_block
    with pytest.raises(ValueError, match="no memory left"):
        decide_num_kv_blocks(EngineConfig(**base, gpu_memory_fraction=0.5), loaded, (30 * gib, 80 * gib))


def test_kernel_dispatch() -> None:
    assert get_ops("auto", torch.device("cpu")).name == "ref"
    assert get_ops("ref", torch.device("cuda")).name == "ref"
    with pytest.raises(ValueError, match="kernel_backend"):
        get_ops("cuda", torch.device("cpu"))


def test_llama_attention_and_mlp_bias_match_hf(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "bias", "llama", attention_bias=True, mlp_bias=True)
    loaded = load(folder)
    assert loaded.config.qkv_bias and loaded.config.o_bias and loaded.config.mlp_bias
    assert loaded.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ids = [0, *range(20, 33)]
    torch.testing.assert_close(
        loaded_prefill_logits(loaded, ids), hf_logits(load_hf(folder), ids), atol=2e-4, rtol=0
    )


def test_linear_rope_scaling_matches_hf(tmp_path: Path) -> None:
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    folder = make_tiny_model(tmp_path / "linear", "llama", rope_scaling=linear)
    loaded = load(folder)
    assert loaded.config.rope_scaling is not None and loaded.config.rope_scaling["rope_type"] == "linear"
    ids = [0, *range(40, 80)]
    torch.testing.assert_close(
        loaded_prefill_logits(loaded, ids), hf_logits(load_hf(folder), ids), atol=2e-4, rtol=0
    )


def test_sliding_window_is_per_layer_and_keeps_the_whole_context(models: dict[str, Path]) -> None:
    raw = _raw(models) | {"architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768}
    cfg = parse_config(raw | {"sliding_window": 4096})
    assert cfg.sliding_window == 4096 and cfg.max_position_embeddings == 32768
    assert [cfg.window_of(i) for i in range(2)] == [4096, 4096]
    assert parse_config(raw | {"sliding_window": None}).window_of(0) is None
    # Qwen2 declares a window but only uses it with use_sliding_window, from max_window_layers on.
    qwen = raw | {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096}
    assert parse_config(qwen).window_of(1) is None
    on = parse_config(qwen | {"use_sliding_window": True, "max_window_layers": 1})
    assert [on.window_of(i) for i in range(2)] == [None, 4096] and on.max_position_embeddings == 32768
    mixed = parse_config(raw | {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]})
    assert [mixed.window_of(i) for i in range(2)] == [None, 8]
    with pytest.raises(ValueError, match="layer_types"):
        parse_config(raw | {"sliding_window": 8, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="positive"):
        parse_config(raw | {"sliding_window": -3})


def test_malformed_model_folders_raise_value_errors(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_config(folder)
    raw = _raw(models)
    del raw["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        parse_config(raw)
    with pytest.raises(ValueError, match="malformed"):
        parse_config(_raw(models) | {"num_attention_heads": None})
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="no weight_map"):
        weight_files(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        load_model(EngineConfig(model=str(models["single"]), device="cuda"))
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-of-my-dreams")
