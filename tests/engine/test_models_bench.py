"""The serving benchmark's `--arch` models (benchmarks/serving_model.py): every family's config.json and
random weights load into the engine and generate, at tiny widths on the CPU (the GPU run uses the same
code at Llama-3-8B widths)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.serving_adapters import ALL_SEVEN, FUSED_NAMES, SeededAdapters
from benchmarks.serving_model import ARCH_CONFIGS, make_engine, model_config, random_model, write_model_folder
from engine import LoRARequest, SamplingParams
from engine.config import EngineConfig

TINY = {
    "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


@pytest.mark.slow  # ~5 s a family (32 layers, engine start)
@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_bench_model_of_every_family_loads_and_generates_with_an_adapter(arch, tmp_path, one_torch_thread):
    folder = write_model_folder(tmp_path / arch, model_config(arch) | TINY)
    loaded = random_model(folder, torch.float32, torch.device("cpu"))
    assert loaded.config.model_type == model_config(arch)["model_type"]
    config = EngineConfig(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=64, max_lora_rank=8)
    targets = FUSED_NAMES[ALL_SEVEN] if arch == "phi3" else ALL_SEVEN
    adapters = SeededAdapters(tmp_path / "adapters", loaded.config, 8, targets, "seven", 4, str(folder))
    engine = make_engine(config, loaded, adapters.loader)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        engine.add_request("base", [1, 5, 6, 7], params)
        engine.add_request("lora", [1, 5, 6, 7], params, lora=adapters.lora(0))
        done: dict[str, list[int]] = {}
        for _ in range(50):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            if len(done) == 2:
                break
        assert len(done["base"]) == len(done["lora"]) == 4
    finally:
        engine.close()
    assert isinstance(adapters.lora(0), LoRARequest)
