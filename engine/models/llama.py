"""Llama family (Llama 2/3, Mistral, Qwen2) over a paged KV cache, with multi-LoRA on every projection.

One flat batch of T new tokens from B sequences; no padding, no prefill/decode split. q/k/v and gate/up
are fused into one matmul each, and their LoRA deltas into one shrink/expand launch.
Numerics follow transformers (RMSNorm and RoPE in float32) so greedy outputs match it token for token.
The elementwise parts (residual add + RMSNorm, RoPE + KV write, SiLU * mul) go through `Ops`, one fused
launch each on the Triton backend (kernels/fused.py), the plain-torch references elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model_config import ModelConfig
from engine.ops import DOWN, GATE_UP, O_PROJ, QKV, AttentionBatch, LoRABatch, Ops


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """[D/2] float32 inverse frequencies, with Llama 3 / linear scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: tuple[Tensor, Tensor],
        attn: AttentionBatch,
        lora: LoRABatch | None,
        ops: Ops,
    ) -> Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x) if lora is None else lora.linear(self.index, QKV, x, self.qkv_proj)
        k_cache, v_cache = kv_cache
        # RoPE on q and k, then k and v into the paged cache: one launch on the Triton backend.
        q = ops.rope_write_kv(
            qkv, cos, sin, k_cache, v_cache, attn.slot_mapping, self.num_heads, self.num_kv_heads
        )  # [T, Hq, D]
        out = ops.paged_attention(
            q,
            k_cache,
            v_cache,
            attn.block_tables,
            attn.seq_lens,
            attn.query_start_loc,
            self.scale,
        )  # [T, Hq, D]
        out = out.reshape(tokens, self.q_size)  # [T, Hq*D]
        return self.o_proj(out) if lora is None else lora.linear(self.index, O_PROJ, out, self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, lora: LoRABatch | None, ops: Ops) -> Tensor:
        up = self.gate_up_proj
        gate_up = up(x) if lora is None else lora.linear(self.index, GATE_UP, x, up)  # [T, 2*I]
        h = ops.silu_mul(gate_up)  # [T, I]
        return self.down_proj(h) if lora is None else lora.linear(self.index, DOWN, h, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.self_attn = Attention(cfg, index)
        self.mlp = MLP(cfg, index)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        kv_cache: tuple[Tensor, Tensor],
        attn: AttentionBatch,
        lora: LoRABatch | None,
        ops: Ops,
    ) -> tuple[Tensor, Tensor]:
        """x is the previous layer's MLP output and `residual` the stream before it (None on the first
        layer, where x is the embedding). Each residual add is fused into the RMSNorm that follows it;
        returns (this layer's MLP output, the stream before it)."""
        h, residual = ops.rms_norm(x, self.input_layernorm, self.eps, residual)
        a = self.self_attn(h, cos, sin, kv_cache, attn, lora, ops)
        h, residual = ops.rms_norm(a, self.post_attention_layernorm, self.eps, residual)
        return self.mlp(h, lora, ops), residual


class LlamaForCausalLM(nn.Module):
    inv_freq: Tensor  # [D/2] float32, a non-persistent buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        attn: AttentionBatch,
        lora: LoRABatch | None,
        ops: Ops,
    ) -> Tensor:
        """input_ids, positions [T] int64 -> final hidden states [T, H]."""
        x = self.embed_tokens(input_ids)  # [T, H]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2] float32
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        residual: Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, attn, lora, ops)
        return ops.rms_norm(x, self.norm, self.config.rms_norm_eps, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, H] -> float32 logits [B, V]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @classmethod
    def from_weights(
        cls,
        cfg: ModelConfig,
        weights: Iterable[tuple[str, Tensor]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> LlamaForCausalLM:
        """Build on the meta device (no random init), then take every tensor from `weights` (HF names)."""
        with torch.device("meta"):
            model = cls(cfg)
        # Cast and move each tensor as it is read, so at most one copy of the weights is in host memory.
        hf = {name: t.to(dtype=dtype, device=device) for name, t in weights}
        if cfg.tie_word_embeddings:
            hf.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
        state: dict[str, Tensor] = {}
        for name in list(hf):
            ours = _our_name(name)
            if ours is not None:
                state[ours] = hf.pop(name)
        for i in range(cfg.num_layers):
            pre = f"model.layers.{i}"
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                parts = [_take(hf, f"{pre}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                state[f"layers.{i}.self_attn.qkv_proj.{kind}"] = torch.cat(parts, dim=0)
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                parts = [_take(hf, f"{pre}.mlp.{p}_proj.{kind}") for p in ("gate", "up")]
                state[f"layers.{i}.mlp.gate_up_proj.{kind}"] = torch.cat(parts, dim=0)
        leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
        if leftover:
            raise ValueError(f"{cfg.architecture}: unexpected weights in checkpoint: {leftover[:5]}")
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"{cfg.architecture}: checkpoint does not fit the config: {exc}") from exc
        model.inv_freq = rope_inv_freq(cfg).to(device)
        model.requires_grad_(False)  # serving only: no autograd graph even outside inference_mode
        return model.eval()


def _take(hf: dict[str, Tensor], name: str) -> Tensor:
    if name not in hf:
        raise ValueError(f"weight {name!r} missing from checkpoint")
    return hf.pop(name)


_DIRECT = {
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "self_attn.o_proj.bias": "self_attn.o_proj.bias",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
}


def _our_name(hf_name: str) -> str | None:
    """HF name -> our parameter name for weights that map one to one; None for fused or unknown ones."""
    if hf_name == "model.embed_tokens.weight":
        return "embed_tokens.weight"
    if hf_name == "model.norm.weight":
        return "norm"
    if hf_name == "lm_head.weight":
        return "lm_head.weight"
    if hf_name.startswith("model.layers."):
        index, _, rest = hf_name[len("model.layers.") :].partition(".")
        if rest in _DIRECT:
            return f"layers.{index}.{_DIRECT[rest]}"
    return None
