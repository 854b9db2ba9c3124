"""The decoder-only causal LM every family is: embeddings, layers (engine/models/layers.py), norm, head.

`from_weights` maps a Hugging Face checkpoint onto it: per-projection q/k/v and gate/up weights are
fused at load (checkpoints that store them fused, like Phi-3, are taken as they are), Gemma's (1 + w)
norms get their 1 added once, tied heads read the embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model_config import ModelConfig
from engine.models.layers import DecoderLayer
from engine.models.rope import head_rows_perm, inv_freq_and_scale
from engine.ops import AttentionBatch, LoRABatch, Ops

if TYPE_CHECKING:
    from engine.parallel.group import TPGroup
    from engine.parallel.sharding import Shard


class CausalLM(nn.Module):
    rope_freqs: Tensor  # [R, D/2] float32, one row per distinct rope of the layers (non-persistent)
    rope_mults: Tensor  # [R, D] float32, the cos/sin multipliers of each (non-persistent)

    def __init__(self, cfg: ModelConfig, shard: Shard | None = None) -> None:
        """shard: build one tensor-parallel rank's part (engine/parallel/sharding.py): its heads, MLP
        width and vocabulary rows; `cfg` is the whole model's config either way."""
        super().__init__()
        if shard is not None:
            cfg = shard.local_config()
        self.config = cfg  # this rank's (the whole model's on one rank)
        self.vocab_rows = cfg.vocab_size if shard is None else shard.vocab_rows
        self.vocab_start = 0 if shard is None else shard.vocab_start
        self.group: TPGroup | None = None  # set by from_weights when sharded
        self.embed_tokens = nn.Embedding(self.vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, self.vocab_rows, bias=False)
        )
        freqs, mults, self.rope_scales, self.rope_index = _ropes(cfg)
        # (hidden, weight) -> logits; deterministic mode puts a batch-invariant product here (engine/quant/).
        self.logits_matmul: Callable[[Tensor, Tensor], Tensor] = F.linear
        self.register_buffer("rope_freqs", freqs, persistent=False)
        self.register_buffer("rope_mults", mults, persistent=False)

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
        x = self._embed(input_ids)  # [T, H]
        if self.config.scale_embeddings:
            # sqrt(hidden) rounded to the model's dtype first, as transformers does; a Python float, so a
            # CUDA-graph capture bakes it in.
            x = x * float(torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype))
        ropes = []
        for freqs_row, mult, scale in zip(self.rope_freqs, self.rope_mults, self.rope_scales, strict=True):
            freqs = positions.float()[:, None] * freqs_row[None, :]  # [T, D/2] float32
            emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
            cos, sin = emb.cos(), emb.sin()
            if scale != 1.0:  # YaRN / LongRoPE attention factor, on the rotating dims only
                cos, sin = cos * mult, sin * mult
            ropes.append((cos.to(x.dtype), sin.to(x.dtype)))
        residual: Tensor | None = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            cos, sin = ropes[self.rope_index[i]]
            x, residual = layer(x, residual, cos, sin, kv_cache, attn, lora, ops)
        return ops.rms_norm(x, self.norm, self.config.rms_norm_eps, residual)[0]

    def _embed(self, input_ids: Tensor) -> Tensor:
        if self.group is None:
            return self.embed_tokens(input_ids)  # type: ignore[no-any-return]
        # Vocab-parallel: each rank looks up the ids in its rows, zeros elsewhere; the sum is the lookup.
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_rows)
        x = self.embed_tokens(local.clamp(0, self.vocab_rows - 1)) * inside[:, None].to(self.norm.dtype)
        return self.group.all_reduce(x)  # [T, H]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, H] -> float32 logits [B, V] (tensor parallel: on rank 0; other ranks get their own
        vocabulary rows' logits back, which nobody reads)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = self.logits_matmul(hidden, weight)  # [B, V] ([B, V / ranks] on one of several ranks)
        if self.group is not None:
            logits = self.group.gather_last_dim(logits)
            if self.group.rank == 0:
                logits = logits[:, : self.config.vocab_size]
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    @classmethod
    def from_weights(
        cls,
        cfg: ModelConfig,
        weights: Iterable[tuple[str, Tensor]],
        dtype: torch.dtype,
        device: torch.device,
        shard: Shard | None = None,
        group: TPGroup | None = None,
    ) -> CausalLM:
        """Build on the meta device (no random init), then take every tensor from `weights` (HF names).
        shard and group: one tensor-parallel rank's part, each tensor cut as it is read."""
        with torch.device("meta"):
            model = cls(cfg, shard)
        # Cast and move each tensor as it is read, so at most one copy of the weights is in host memory.
        if shard is not None:
            weights = ((name, shard.weight(name, t)) for name, t in weights)
            cfg = shard.local_config()
        hf = {name: t.to(dtype=dtype, device=device) for name, t in weights}
        if cfg.tie_word_embeddings:
            hf.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
        state: dict[str, Tensor] = {}
        for name in list(hf):
            ours = _our_name(name)
            if ours is not None:
                state[ours] = hf.pop(name)
        for i in range(cfg.num_layers):
            _fuse(hf, state, f"model.layers.{i}.self_attn", "qkv", ("q", "k", "v"), cfg.qkv_bias, i)
            _fuse(hf, state, f"model.layers.{i}.mlp", "gate_up", ("gate", "up"), cfg.mlp_bias, i)
        if cfg.rotary_dim is not None and cfg.rotary_dim != cfg.head_dim:
            _reorder_rotary_rows(state, cfg)
        leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
        if leftover:
            raise ValueError(f"{cfg.architecture}: unexpected weights in checkpoint: {leftover[:5]}")
        if cfg.norm_offset:
            for key, value in state.items():
                if _is_norm(key):
                    # In float32, then cast: (1 + w) rounded once, as close to HF's float math as the dtype allows.
                    state[key] = (value.float() + cfg.norm_offset).to(dtype)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"{cfg.architecture}: checkpoint does not fit the config: {exc}") from exc
        freqs, mults, _, _ = _ropes(cfg)
        model.rope_freqs, model.rope_mults = freqs.to(device), mults.to(device)
        model.requires_grad_(False)  # serving only: no autograd graph even outside inference_mode
        if group is not None:
            model.group = group
            for layer in model.layers:
                assert isinstance(layer, DecoderLayer)
                layer.self_attn.reduce = layer.mlp.reduce = group.all_reduce
        return model.eval()


def _ropes(cfg: ModelConfig) -> tuple[Tensor, Tensor, list[float], list[int]]:
    """The distinct ropes of the layers: [R, D/2] frequencies, [R, D] cos/sin multipliers (the rope's
    attention factor on rotating dims, 1 on the others), the R factors, and each layer's row."""
    rows: list[Tensor] = []
    mults: list[Tensor] = []
    scales: list[float] = []
    index: list[int] = []
    keys: list[str] = []
    for layer in range(cfg.num_layers):
        rope = cfg.rope_of(layer)
        key = repr(sorted(rope.items()))
        if key not in keys:
            rotary = cfg.rotary_dim or cfg.head_dim
            freqs, scale = inv_freq_and_scale(rotary, rope, cfg.max_position_embeddings)
            # Partial rotary: the non-rotating dims (placed last in each half at load) get frequency 0.
            rest = cfg.head_dim // 2 - freqs.numel()
            freqs = torch.cat((freqs, torch.zeros(rest)))
            half = torch.cat((torch.full((cfg.head_dim // 2 - rest,), scale), torch.ones(rest)))
            keys.append(key)
            rows.append(freqs)
            mults.append(torch.cat((half, half)))
            scales.append(scale)
        index.append(keys.index(key))
    return torch.stack(rows), torch.stack(mults), scales, index


def _reorder_rotary_rows(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """q and k output rows of every qkv_proj in partial_rotary_perm's order (v stays)."""
    assert cfg.rotary_dim is not None
    q_rows = head_rows_perm(cfg.num_heads, cfg.head_dim, cfg.rotary_dim)
    k_rows = head_rows_perm(cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) + cfg.q_size
    v_rows = torch.arange(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    rows = torch.cat((q_rows, k_rows, v_rows))
    for key in [k for k in state if ".qkv_proj." in k]:
        state[key] = state[key][rows.to(state[key].device)].contiguous()


def _fuse(
    hf: dict[str, Tensor],
    state: dict[str, Tensor],
    prefix: str,
    fused: str,
    parts: tuple[str, ...],
    bias: bool,
    layer: int,
) -> None:
    """Our fused `<fused>_proj` from the checkpoint's fused tensor or its per-projection ones."""
    ours = f"layers.{layer}.{prefix.rsplit('.', 1)[1]}.{fused}_proj"
    for kind in ("weight", "bias") if bias else ("weight",):
        whole = f"{prefix}.{fused}_proj.{kind}"
        if whole in hf:
            state[f"{ours}.{kind}"] = hf.pop(whole)
        else:
            state[f"{ours}.{kind}"] = torch.cat(
                [_take(hf, f"{prefix}.{p}_proj.{kind}") for p in parts], dim=0
            )


def _take(hf: dict[str, Tensor], name: str) -> Tensor:
    if name not in hf:
        raise ValueError(f"weight {name!r} missing from checkpoint")
    return hf.pop(name)


# Per-layer HF names that map one to one (norms are Parameters of ours, so ".weight" is dropped).
_DIRECT = {
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "self_attn.o_proj.bias": "self_attn.o_proj.bias",
    "self_attn.q_norm.weight": "self_attn.q_norm",
    "self_attn.k_norm.weight": "self_attn.k_norm",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
    "pre_feedforward_layernorm.weight": "pre_feedforward_layernorm",
    "post_feedforward_layernorm.weight": "post_feedforward_layernorm",
}


def _is_norm(ours: str) -> bool:
    return ours == "norm" or ours.endswith(("layernorm", "_norm"))


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
