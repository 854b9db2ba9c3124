"""The demo model folder: complete, deterministic, idempotent, loadable by us *and* by transformers + PEFT
(so it is a real HF/PEFT folder), and our logits match theirs on it, with each demo adapter too."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import EngineConfig
from engine.demo import DEMO_ADAPTERS, write_demo_model
from engine.lora import load_adapter
from engine.model_loader import load_model
from tests.helpers.hf_models import hf_logits, load_hf


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_demo_is_fast_deterministic_and_idempotent(demo: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    again = write_demo_model(tmp_path / "again")
    assert time.perf_counter() - start < 30  # ~2 s alone; generous for a busy shared CI machine
    # Same seed -> same bytes (the tokenizer training and random weights are deterministic).
    assert digest(again) == digest(demo)
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    write_demo_model(again)
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == before
    names = {p.name for p in demo.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sorted(p.name for p in (demo / "adapters").iterdir()) == sorted(DEMO_ADAPTERS)


def test_tokenizer_and_chat_template(demo: Path) -> None:
    loaded = load_model(EngineConfig(model=str(demo), device="cpu", dtype="float32"))
    tok = loaded.tokenizer
    text = "Hello, world! Émilie a réservé une table."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode())  # BPE merges learned something
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id in loaded.eos_token_ids


def test_adapters_are_non_trivial(demo: Path) -> None:
    loaded = load_model(EngineConfig(model=str(demo), device="cpu", dtype="float32"))
    for name, spec in DEMO_ADAPTERS.items():
        folder = demo / "adapters" / name
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        b_keys = [k for k in tensors if "lora_B" in k]
        assert b_keys and all(torch.count_nonzero(tensors[k]) > 0 for k in b_keys)
        adapter = load_adapter(folder, loaded.config, max_rank=16)
        assert adapter.rank == spec["r"] and set(adapter.a) == set(spec["target_modules"])


def test_our_logits_match_transformers_and_peft_on_the_demo(demo: Path) -> None:
    from engine.adapter_cache import AdapterCache
    from engine.model_runner import ModelRunner
    from engine.request import LoRARequest, Request
    from engine.sampling_params import SamplingParams

    config = EngineConfig(model=str(demo), device="cpu", dtype="float32", num_kv_blocks=16, max_loras=2)
    loaded = load_model(config)
    runner = ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))
    adapters = {name: demo / "adapters" / name for name in DEMO_ADAPTERS}
    slots = {}
    for name, path in adapters.items():
        lora = LoRARequest(name, str(path))
        if runner.adapter_cache.acquire(lora) is None:
            runner.adapter_cache.wait_for_loads(timeout=30)
        slots[name] = runner.adapter_cache.acquire(lora)
    prompt = loaded.tokenizer.encode("Once upon a time there was a robot")
    names: list[str | None] = [None, *adapters]
    reqs = []
    for i, name in enumerate(names):
        req = Request(request_id=str(i), prompt_token_ids=prompt, params=SamplingParams())
        req.lora_slot = -1 if name is None else slots[name]
        req.block_table = [2 * i, 2 * i + 1, 2 * i + 2 + 6]
        reqs.append(req)
    logits = runner.execute([(r, len(prompt)) for r in reqs])
    hf = load_hf(demo, adapters)
    for row, name in zip(logits, names, strict=True):
        torch.testing.assert_close(row, hf_logits(hf, prompt, name)[-1], atol=2e-4, rtol=0)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
