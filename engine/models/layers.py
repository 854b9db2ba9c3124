"""The pieces every decoder family shares: attention over the paged KV cache, the gated MLP, the layer.

What differs between families is switched by ModelConfig fields (q/k norm, sandwich norms, activation,
attention scale, soft-capping, per-layer window), so a family file only says how its config.json maps
onto them. One flat batch of T new tokens from B sequences; q/k/v and gate/up are fused into one matmul
each, and their LoRA deltas into one shrink/expand launch. Numerics follow transformers (RMSNorm and RoPE
in float32). The elementwise parts (residual add + RMSNorm, RoPE + KV write, SiLU * mul) go through
`Ops`, one fused launch each on the Triton backend (kernels/fused.py), the torch references elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model_config import ModelConfig
from engine.ops import DOWN, GATE_UP, O_PROJ, QKV, AttentionBatch, LoRABatch, Ops


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.window = cfg.window_of(index) or 0  # 0 = full causal attention
        self.softcap = cfg.attn_logit_softcap or 0.0  # 0 = none
        self.eps = cfg.rms_norm_eps
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = nn.Parameter(torch.ones(cfg.head_dim)) if cfg.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(cfg.head_dim)) if cfg.qk_norm else None
        # Tensor parallel (engine/parallel/): the all-reduce after the row-parallel o_proj; None: one rank.
        self.reduce: Callable[[Tensor], Tensor] | None = None

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
        if self.q_norm is not None and self.k_norm is not None:
            qkv = self._qk_norm(qkv, ops)
        k_cache, v_cache = kv_cache
        # RoPE on q and k, then k and v into the paged cache: one launch on the Triton backend.
        q = ops.rope_write_kv(
            qkv, cos, sin, k_cache, v_cache, attn.slot_mapping, self.num_heads, self.num_kv_heads
        )  # [T, Hq, D]
        extra: dict[str, float] = {}
        if self.window:
            extra["window"] = self.window
        if self.softcap:
            extra["softcap"] = self.softcap
        out = ops.paged_attention(
            q, k_cache, v_cache, attn.block_tables, attn.seq_lens, attn.query_start_loc, self.scale, **extra
        )  # [T, Hq, D]
        out = out.reshape(tokens, self.q_size)  # [T, Hq*D]
        out = self.o_proj(out) if lora is None else lora.linear(self.index, O_PROJ, out, self.o_proj)
        return out if self.reduce is None else self.reduce(out)  # tensor parallel: sum the partial outputs

    def _qk_norm(self, qkv: Tensor, ops: Ops) -> Tensor:
        """RMSNorm over each head of q and of k (Qwen3, Gemma 3), v untouched."""
        assert self.q_norm is not None and self.k_norm is not None
        tokens, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = ops.rms_norm(q.reshape(-1, d), self.q_norm, self.eps, None)[0].reshape(tokens, self.q_size)
        k = ops.rms_norm(k.reshape(-1, d), self.k_norm, self.eps, None)[0].reshape(tokens, self.kv_size)
        return torch.cat((q, k, v), dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.reduce: Callable[[Tensor], Tensor] | None = None  # as Attention.reduce, after down_proj

    def forward(self, x: Tensor, lora: LoRABatch | None, ops: Ops) -> Tensor:
        up = self.gate_up_proj
        gate_up = up(x) if lora is None else lora.linear(self.index, GATE_UP, x, up)  # [T, 2*I]
        if self.gelu:
            gate, value = gate_up.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * value  # [T, I]
        else:
            h = ops.silu_mul(gate_up)  # [T, I]
        out = self.down_proj(h) if lora is None else lora.linear(self.index, DOWN, h, self.down_proj)
        return out if self.reduce is None else self.reduce(out)  # tensor parallel: sum the partial outputs


class DecoderLayer(nn.Module):
    """Pre-norm layer; with `sandwich_norm` (Gemma) the attention and MLP outputs are normed too, and
    `post_attention_layernorm` is the norm after attention rather than the one before the MLP (HF names)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        if self.sandwich:
            self.pre_feedforward_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
            self.post_feedforward_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
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
        if not self.sandwich:
            h, residual = ops.rms_norm(a, self.post_attention_layernorm, self.eps, residual)
            return self.mlp(h, lora, ops), residual
        a = ops.rms_norm(a, self.post_attention_layernorm, self.eps, None)[0]
        h, residual = ops.rms_norm(a, self.pre_feedforward_layernorm, self.eps, residual)
        m = self.mlp(h, lora, ops)
        return ops.rms_norm(m, self.post_feedforward_layernorm, self.eps, None)[0], residual
