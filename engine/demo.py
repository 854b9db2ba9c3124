"""A tiny demo model folder: random Llama weights, a byte-level BPE tokenizer, two PEFT adapters.

It is the embedded default for `loraplex serve` and a fixture for tests, so it must be made in a few
seconds on a CPU from nothing but code in this file (no downloads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from engine.lora import module_shapes
from engine.model_loader import parse_config

BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"
PAD = "<|end_of_text|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (BOS, PAD, IM_START, EOS)

# ChatML: simple to read, and its turn end doubles as the stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough varied English for BPE to learn a few hundred useful merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello, world! How are you today? I am fine, thank you. What is the weather like in the city?
Language models predict the next token from the tokens before it. Each customer may bring an adapter
that changes how the shared base model answers, without copying the whole model for every tenant.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
The sea was calm and blue, and the robot counted the waves: one, two, three, four, five, six, seven.
Numbers like 12, 345 and 6789 appear in text, as do dates such as 2024-05-17 and times like 10:30.
Please summarise the following paragraph in one sentence. Translate this sentence into French.
def add(a, b):\n    return a + b\nprint(add(2, 3))\nfor i in range(10):\n    print(i * i)\n
Émilie a réservé une table au café près de la gare. Größe, naïve, coöperate, résumé, déjà vu.
Servers stream tokens back to clients as soon as they are ready, so the first token arrives quickly.
""".strip()


def write_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE on the built-in text and save it where AutoTokenizer finds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: encode() prepends BOS; the chat template writes it itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(out_dir))


def demo_config(vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }


DEMO_ADAPTERS: dict[str, dict[str, Any]] = {
    # name -> (rank, alpha, target modules): two different ranks and target sets, like real tenants.
    "demo-attn": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "demo-mlp": {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}
_DONE_MARKER = ".loraplex-demo-complete"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _random_weights(cfg: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, i, v = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    d = int(cfg["head_dim"])
    q, kv = int(cfg["num_attention_heads"]) * d, int(cfg["num_key_value_heads"]) * d

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1

    w = {
        "model.embed_tokens.weight": rand(v, h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": rand(v, h),
    }
    for layer in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{layer}"
        w.update(
            {
                f"{p}.input_layernorm.weight": torch.ones(h),
                f"{p}.post_attention_layernorm.weight": torch.ones(h),
                f"{p}.self_attn.q_proj.weight": rand(q, h),
                f"{p}.self_attn.k_proj.weight": rand(kv, h),
                f"{p}.self_attn.v_proj.weight": rand(kv, h),
                f"{p}.self_attn.o_proj.weight": rand(h, q),
                f"{p}.mlp.gate_proj.weight": rand(i, h),
                f"{p}.mlp.up_proj.weight": rand(i, h),
                f"{p}.mlp.down_proj.weight": rand(h, i),
            }
        )
    return w


def write_adapter(
    out_dir: Path, cfg: dict[str, Any], r: int, lora_alpha: float, target_modules: list[str], seed: int
) -> Path:
    """A PEFT-format LoRA adapter with random non-zero A and B (zero B would be a no-op adapter)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dims = module_shapes(parse_config(cfg))
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(cfg["num_hidden_layers"])):
        for module in target_modules:
            d_in, d_out = dims[module]
            prefix = (
                f"base_model.model.model.layers.{layer}.{'self_attn' if module in _ATTN else 'mlp'}.{module}"
            )
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.1
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def write_demo_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the demo model folder (weights, config, tokenizer, chat template, adapters/). Idempotent:
    a folder that is already complete is left as it is."""
    out = Path(out_dir)
    if (out / _DONE_MARKER).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = 512
    write_tokenizer(out, vocab_size=vocab_size)
    cfg = demo_config(vocab_size)
    cfg.update(bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS))
    cfg["pad_token_id"] = SPECIAL_TOKENS.index(PAD)
    gen = torch.Generator().manual_seed(seed)
    save_file(_random_weights(cfg, gen), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for index, (name, spec) in enumerate(DEMO_ADAPTERS.items()):
        write_adapter(out / "adapters" / name, cfg, seed=seed + 1 + index, **spec)
    (out / _DONE_MARKER).write_text("complete\n")
    return out
