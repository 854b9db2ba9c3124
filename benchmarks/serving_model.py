"""Models for the serving benchmark: a Llama-3-8B-shaped model with random weights made on the GPU (no
download, nothing written but config.json and a tokenizer), and a transformers twin that shares its
weights, so the HF + PEFT baseline costs no second 16 GB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_loader import LoadedModel, load_config
from engine.model_runner import ModelRunner
from engine.models.causal_lm import CausalLM
from engine.tokenizer import load_tokenizer

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


# Each family's features on Llama-3-8B's shapes (`--arch`), so its decode speed compares with Llama's:
# what each adds (q/k norms, four norms and GELU, soft-capping, windows, fused checkpoints) is what costs.
# Heads stay untied (real Gemmas tie them) so every family reads the same weight bytes per step, which is
# what the roofline of workload a counts.
_WINDOW_LAYERS = ["sliding_attention", "full_attention"] * 16
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rope_theta": 1000000.0},
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 128, "sliding_window": 4096,
        "layer_types": _WINDOW_LAYERS, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "rope_theta": 10000.0,
    },
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 128, "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5 + ["sliding_attention"] * 2,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    },
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rope_theta": 10000.0},
}  # fmt: skip


def model_config(arch: str) -> dict[str, Any]:
    """config.json of the Llama-3-8B-shaped model of family `arch` (ARCH_CONFIGS)."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown --arch {arch!r}; one of {', '.join(ARCH_CONFIGS)}")
    return {**LLAMA3_8B, **ARCH_CONFIGS[arch]}


def write_model_folder(folder: Path, raw: dict[str, Any]) -> Path:
    """config.json plus a word-level tokenizer with one token per id ("t17"), so detokenising works."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    vocab = {f"t{i}": i for i in range(raw["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{raw['eos_token_id']}"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token="t0").save_pretrained(str(folder))
    return folder


def random_weights(cfg: Any, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """(HF name, tensor) for every weight, drawn on `device` from a seeded generator, std 0.02."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * 0.02

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    def norm(n: int) -> torch.Tensor:  # a scale of 1 either way: Gemma's (1 + w) norms store w = 0
        return ones(n) * (1 - cfg.norm_offset)

    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    yield "model.embed_tokens.weight", rand(v, h)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}"
        if cfg.model_type == "phi3":  # stored fused
            yield f"{p}.self_attn.qkv_proj.weight", rand(cfg.q_size + 2 * cfg.kv_size, h)
            yield f"{p}.mlp.gate_up_proj.weight", rand(2 * i, h)
        else:
            yield f"{p}.self_attn.q_proj.weight", rand(cfg.q_size, h)
            yield f"{p}.self_attn.k_proj.weight", rand(cfg.kv_size, h)
            yield f"{p}.self_attn.v_proj.weight", rand(cfg.kv_size, h)
            yield f"{p}.mlp.gate_proj.weight", rand(i, h)
            yield f"{p}.mlp.up_proj.weight", rand(i, h)
        yield f"{p}.self_attn.o_proj.weight", rand(h, cfg.q_size)
        yield f"{p}.mlp.down_proj.weight", rand(h, i)
        yield f"{p}.input_layernorm.weight", norm(h)
        yield f"{p}.post_attention_layernorm.weight", norm(h)
        if cfg.sandwich_norm:
            yield f"{p}.pre_feedforward_layernorm.weight", norm(h)
            yield f"{p}.post_feedforward_layernorm.weight", norm(h)
        if cfg.qk_norm:
            yield f"{p}.self_attn.q_norm.weight", norm(cfg.head_dim)
            yield f"{p}.self_attn.k_norm.weight", norm(cfg.head_dim)
    yield "model.norm.weight", norm(h)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", rand(v, h)


def random_model(folder: Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LoadedModel:
    cfg = load_config(folder)
    model = CausalLM.from_weights(cfg, random_weights(cfg, dtype, device, seed), dtype, device)
    return LoadedModel(
        name=folder.name,
        path=str(folder),
        config=cfg,
        model=model,
        tokenizer=load_tokenizer(folder),
        device=device,
        dtype=dtype,
    )


def make_engine(config: EngineConfig, loaded: LoadedModel, loader: Any) -> LLMEngine:
    """What LLMEngine.from_config does, with an already built model."""
    cache = AdapterCache.for_model(config, loaded, loader)
    return LLMEngine(config, loaded, ModelRunner(config, loaded, cache), cache)


def hf_twin(loaded: LoadedModel) -> Any:
    """A transformers LlamaForCausalLM whose every weight is a view of ours (q/k/v and gate/up are row
    slices of our fused matrices, so contiguous views): no copy, same numbers."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = json.loads((Path(loaded.path) / "config.json").read_text())
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = HFLlama(config)
    ours = loaded.model
    cfg = loaded.config

    def put(module: nn.Module, weight: torch.Tensor) -> None:
        module.weight = nn.Parameter(weight, requires_grad=False)

    put(hf.model.embed_tokens, ours.embed_tokens.weight)
    put(hf.model.norm, ours.norm)
    put(hf.lm_head, ours.embed_tokens.weight if ours.lm_head is None else ours.lm_head.weight)
    for mine, theirs in zip(ours.layers, hf.model.layers, strict=True):
        q, k, v = mine.self_attn.qkv_proj.weight.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        put(theirs.self_attn.q_proj, q)
        put(theirs.self_attn.k_proj, k)
        put(theirs.self_attn.v_proj, v)
        put(theirs.self_attn.o_proj, mine.self_attn.o_proj.weight)
        gate, up = mine.mlp.gate_up_proj.weight.split(cfg.intermediate_size)
        put(theirs.mlp.gate_proj, gate)
        put(theirs.mlp.up_proj, up)
        put(theirs.mlp.down_proj, mine.mlp.down_proj.weight)
        put(theirs.input_layernorm, mine.input_layernorm)
        put(theirs.post_attention_layernorm, mine.post_attention_layernorm)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(loaded.device)
    return hf.eval()
