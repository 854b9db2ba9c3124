"""Small random Hugging Face models and PEFT adapters for tests, plus transformers + PEFT as the oracle.

Tests may use transformers' modeling classes here (they are the reference); the engine must not.
Everything is float32 and tiny so it runs in well under a second per model on a 2-core CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.demo import write_tokenizer

VOCAB_SIZE = 512

_BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 3,
    "pad_token_id": 1,
    # Larger than HF's 0.02 so logits are far apart and greedy choices are not near-ties.
    "initializer_range": 0.1,
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(arch: str, overrides: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ValueError(f"unknown test architecture {arch!r}")
    values = dict(_BASE_CONFIG)
    if arch == "mistral":
        values["sliding_window"] = None
    values.update(overrides)
    # transformers 5 reads rope settings from `rope_parameters`; accept the older name in tests too.
    if "rope_scaling" in values:
        values["rope_parameters"] = values.pop("rope_scaling")
    return classes[arch](**values)


def _model_class(arch: str) -> Any:
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    return {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    sharded: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random `arch` model (llama | mistral | qwen2) with a tokenizer into `out_dir`.

    Overrides go to the transformers config, e.g. `tie_word_embeddings=True`,
    `rope_scaling=LLAMA3_ROPE`, `num_hidden_layers=3`. Qwen2 has q/k/v bias by construction.
    `sharded=True` splits the weights over several safetensors files with an index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(arch, config_overrides)
    torch.manual_seed(seed)
    model = _model_class(arch)(config).to(torch.float32).eval()
    # HF zero-initialises biases (Qwen2's q/k/v, attention_bias, mlp_bias); random ones make a wrong
    # bias path visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    shard = "100KB" if sharded else "2GB"
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=shard)
    write_tokenizer(out, vocab_size=config.vocab_size)
    return out


def make_peft_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    alpha: float = 16,
    use_rslora: bool = False,
    seed: int = 0,
    **lora_overrides: Any,
) -> Path:
    """Save a real PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for `base_dir`.

    PEFT initialises lora_B to zero, which would make any LoRA path look right; B is randomised here.
    Extra keyword arguments go to `peft.LoraConfig` (e.g. `rank_pattern`, `use_dora`, `bias`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        **lora_overrides,
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    for extra in out.glob("*"):
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    return out


def load_hf(base_dir: str | Path, adapters: dict[str, Path] | None = None) -> Any:
    """transformers model (float32, eval), wrapped in PEFT with every adapter loaded by name.

    Eager attention: the plain reference on every transformers version (with SDPA, which has no soft-cap
    argument, the GPU image's transformers 5.17 gave other Gemma 2 tokens than the engine; with eager
    attention they agree).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if not adapters:
        return model
    items = list(adapters.items())
    peft_model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=name)
    return peft_model.eval()


@torch.no_grad()
def hf_logits(model: Any, token_ids: list[int], adapter_name: str | None = None) -> torch.Tensor:
    """[T, V] float32 logits of every position of one sequence."""
    kwargs: dict[str, Any] = {}
    if adapter_name is not None or hasattr(model, "peft_config"):
        kwargs["adapter_names"] = [adapter_name or "__base__"]
    out = model(input_ids=torch.tensor([token_ids]), **kwargs)
    return out.logits[0].float()


@torch.no_grad()
def hf_greedy(
    base_dir: str | Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    adapter_names: list[str | None],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """The oracle: greedy continuations by transformers + PEFT, adapters mixed through `adapter_names`.

    Prompts of equal length share one batch (a mixed-adapter batch without padding, which could
    perturb results); `None` in `adapter_names` means the base model. Generation stops after
    `max_new_tokens`, or after emitting `eos_token_id` when one is given.
    """
    if len(prompts) != len(adapter_names):
        raise ValueError("one adapter name (or None) per prompt")
    model = load_hf(base_dir, adapters)
    results: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idxs in by_len.values():
        seqs = [list(prompts[i]) for i in idxs]
        names = [adapter_names[i] or "__base__" for i in idxs]
        done = [False] * len(idxs)
        for _ in range(max_new_tokens):
            kwargs = {"adapter_names": names} if adapters else {}
            logits = model(input_ids=torch.tensor(seqs), **kwargs).logits[:, -1, :]
            nxt = logits.argmax(dim=-1).tolist()
            for j, tok in enumerate(nxt):
                seqs[j].append(tok)  # keeps lengths equal; finished rows are trimmed below
                if not done[j]:
                    results[idxs[j]].append(tok)
                    done[j] = eos_token_id is not None and tok == eos_token_id
            if all(done):
                break
    return results


def adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
