"""Tiny random models of every served family, made with transformers' own config and model classes, and
the engine-vs-transformers+PEFT check each family's test runs (tests/engine/test_models_*.py).

Extends tests/helpers/hf_models.py (same base shapes, tokenizer, adapters and oracle) to the families it
does not make: Qwen3, Gemma 2, Gemma 3 (text), Phi-3.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.demo import write_tokenizer
from tests.helpers.hf_models import _BASE_CONFIG, VOCAB_SIZE, hf_greedy


def _classes(arch: str) -> tuple[Any, Any]:
    import transformers as tf

    table = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }
    if arch not in table:
        raise ValueError(f"unknown test architecture {arch!r}")
    return table[arch]


def make_family_model(out_dir: str | Path, arch: str, *, seed: int = 0, **overrides: Any) -> Path:
    """A random `arch` model (float32) with the shared test tokenizer, saved as sharded safetensors.

    Norm weights get noise (HF initialises them to 1, or 0 for Gemma's (1 + w)), biases too, so that a
    norm or bias the engine misreads changes the tokens."""
    config_cls, model_cls = _classes(arch)
    values = dict(_BASE_CONFIG)
    if arch == "phi3":
        values.pop("head_dim")  # hidden / heads
    values.update(overrides)
    if "rope_scaling" in values:
        values["rope_parameters"] = values.pop("rope_scaling")
    config = config_cls(**values)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="200KB")
    write_tokenizer(out, vocab_size=config.vocab_size)
    return out


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def make_partial_rotary_phi3(out_dir: Path) -> Path:
    """Phi-4-mini's shape in small: half of each head rotates (head_dim 16 -> 8 rotating dims), LongRoPE
    factors for those dims only, an original context of 16 that the tests' prompts pass."""
    half = 4
    rope = {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [1.0 + 0.7 * i for i in range(half)],
    }  # fmt: skip
    return make_family_model(
        out_dir, "phi3", rope_parameters=rope, partial_rotary_factor=0.5,
        original_max_position_embeddings=16, max_position_embeddings=128,
    )  # fmt: skip


def prompts(n: int, seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(lengths[i % len(lengths)] - 1)] for i in range(n)
    ]


def make_llm(base: Path, **overrides: Any) -> LLM:
    config = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_kv_blocks": 128, "max_lora_rank": 16}
    config.update(overrides)
    return LLM(str(base), **config)


def check_family(
    base: Path, adapters: dict[str, Path], lengths: tuple[int, ...], seed: int = 0, **engine: Any
) -> None:
    """Greedy tokens equal transformers + PEFT on a batch mixing both adapters with base rows, cut up by
    chunked prefill (a 16-token budget) and preempted (a KV cache too small for the batch), then again on
    the same engine with the prompts' blocks in the prefix cache. `engine`: EngineConfig overrides (the
    GPU test runs it on CUDA with the Triton kernels)."""
    names: list[str | None] = [*adapters, None] * 2
    ps = prompts(len(names), seed, lengths)
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    expected = hf_greedy(base, adapters, ps, names, 8)
    longest = max(len(p) for p in ps) + 8
    blocks = -(-longest // 4) + 4  # the longest request fits; the batch does not
    llm = make_llm(base, num_kv_blocks=blocks, max_num_batched_tokens=16, **engine)
    outs = llm.generate(ps, GREEDY, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    # The adapters change the output (else a dropped LoRA path could pass).
    assert expected != hf_greedy(base, {}, ps, [None] * len(ps), 8)
    again = make_llm(base, max_num_batched_tokens=16, **engine)
    first = again.generate(ps, GREEDY, lora_request=loras)
    hit = again.generate(ps, GREEDY, lora_request=loras)
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in hit] == expected
    assert all(o.num_cached_tokens > 0 for o in hit)


def prefill_logits(base: Path, ids: list[int]) -> torch.Tensor:
    """Our float32 logits at every position of one sequence, prefilled in one step (reference kernels)."""
    from engine.config import EngineConfig
    from engine.model_loader import load_model

    return loaded_prefill_logits(
        load_model(EngineConfig(model=str(base), device="cpu", dtype="float32")), ids
    )


def loaded_prefill_logits(loaded: Any, ids: list[int]) -> torch.Tensor:
    """prefill_logits of a loaded model (engine/model_loader.py's LoadedModel), in its dtype, with the
    reference kernels (benchmarks/serving_fp8.py's prefill_logits)."""
    from benchmarks.serving_fp8 import prefill_logits as prefill
    from engine.ops import get_ops

    return prefill(loaded, get_ops("ref", loaded.device), ids)
