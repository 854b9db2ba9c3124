"""Kernel dispatch: the Triton kernels on CUDA, their plain-torch references elsewhere.

The model and the runner call only these functions, so swapping the implementation never touches model
code. The choice comes from `EngineConfig.kernel_backend` (never from the environment), made once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kernels import attention, fused, lora
from kernels.lora import LoRALaunch, LoRAMeta, make_lora_meta

BACKENDS = ("auto", "triton", "ref")
# Deterministic mode (docs/quantization.md): launch shapes fixed whatever the batch, no split-K atomics in
# the shrink, no split of the attention's context (its merge order would follow the batch size).
DETERMINISTIC_LORA = LoRALaunch(block_m=16, block_k=128, split_k=1, block_n=128, tiles_per_program=2)
DETERMINISTIC_ATTENTION_ROWS = 16


@dataclass(frozen=True)
class Ops:
    name: str  # "triton" or "ref"
    lora_shrink: Callable[..., None]
    lora_expand: Callable[..., None]
    write_kv: Callable[..., None]
    paged_attention: Callable[..., Tensor]
    rms_norm: Callable[..., tuple[Tensor, Tensor]]  # (x, weight, eps, residual) -> (normed, x + residual)
    rope_write_kv: Callable[..., Tensor]  # (qkv, cos, sin, k_cache, v_cache, slots, Hq, Hkv) -> q [T, Hq, D]
    silu_mul: Callable[..., Tensor]  # gate_up [T, 2I] -> silu(gate) * up [T, I]

    @staticmethod
    def make_lora_meta(token_slots: Tensor, max_segments: int) -> LoRAMeta:
        return make_lora_meta(token_slots, max_segments)


def _triton_fn(module: Any, name: str) -> Callable[..., Any]:
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"kernel_backend 'triton' asked for, but kernels.{module.__name__} has no {name}")
    return fn  # type: ignore[no-any-return]


def get_ops(backend: str, device: torch.device, deterministic: bool = False) -> Ops:
    """`auto` = Triton on CUDA, references on CPU; `triton` on a CPU only works under TRITON_INTERPRET=1.
    deterministic: every kernel sums a token's values in an order that does not depend on the batch."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and device.type == "cuda")
    if not use_triton:
        return Ops(
            name="ref",
            lora_shrink=functools.partial(lora.lora_shrink_ref, per_token=deterministic),
            lora_expand=functools.partial(lora.lora_expand_ref, per_token=deterministic),
            write_kv=attention.write_kv_ref,
            paged_attention=attention.paged_attention_ref,  # one sequence at a time already
            rms_norm=fused.rms_norm_ref,
            rope_write_kv=fused.rope_write_kv_ref,
            silu_mul=fused.silu_mul_ref,
        )
    shrink, expand = _triton_fn(lora, "lora_shrink"), _triton_fn(lora, "lora_expand")
    paged = _triton_fn(attention, "paged_attention")
    if deterministic:
        shrink = functools.partial(shrink, launch=DETERMINISTIC_LORA)
        expand = functools.partial(expand, launch=DETERMINISTIC_LORA)
        paged = functools.partial(paged, num_splits=1, block_rows=DETERMINISTIC_ATTENTION_ROWS)
    return Ops(
        name="triton",
        lora_shrink=shrink,
        lora_expand=expand,
        write_kv=_triton_fn(attention, "write_kv"),
        paged_attention=paged,
        rms_norm=_triton_fn(fused, "rms_norm"),
        rope_write_kv=_triton_fn(fused, "rope_write_kv"),
        silu_mul=_triton_fn(fused, "silu_mul"),
    )


@dataclass
class AttentionBatch:
    """Per-step paged-attention inputs, shared by every layer (see docs/internals.md)."""

    slot_mapping: Tensor  # [T] int64, cache slot of each new token (-1 = do not write)
    block_tables: Tensor  # [B, max_blocks] int32
    seq_lens: Tensor  # [B] int32, context length including the new tokens
    query_start_loc: Tensor  # [B+1] int32, cumulative new-token counts


@dataclass
class LoRABatch:
    """Per-step LoRA inputs: the token->slot grouping plus the slot weights of the adapter cache.

    `a[m]` is [L, S, R, in_m], `b[m]` is [L, S, out_m, R] (zeros where an adapter does not target m),
    `scales` [S] float32 and `ranks` [L, G, S] int32 with G the module groups below. `active[l][g]` is
    False where no adapter of this step targets group g of layer l: those launches are skipped.
    """

    meta: LoRAMeta
    a: dict[str, Tensor]
    b: dict[str, Tensor]
    scales: Tensor
    ranks: Tensor
    ops: Ops
    active: list[list[bool]]
    # CUDA: a second stream for the shrink, so that it runs beside the base projection (`linear`).
    stream: Any = None
    # Tensor parallelism's fully_sharded_loras (engine/parallel/sharding.py): [L, G, S] this rank's rows
    # of A per slot (None: `ranks`), and the all-gather of a column-parallel group's shrink over the rank
    # dimension, [N, T, R / ranks] -> [N, T, R] (None: A is whole on this rank).
    shrink_ranks: Tensor | None = None
    gather: Callable[[Tensor], Tensor] | None = None

    def linear(self, layer: int, group: int, x: Tensor, proj: Any) -> Tensor:
        """proj(x) plus the LoRA delta of `group`. In a CUDA-graph capture with a side stream, the shrink
        (x @ A.T, small and latency-bound) runs there while the base GEMM reads the weights; the expand
        adds into the GEMM's output after both. The shrink's buffer and x are allocated on the main
        stream and live past the join, so the allocator never hands their memory to anything else while
        the side stream reads them."""
        if not self.active[layer][group]:
            return proj(x)  # type: ignore[no-any-return]
        if self.stream is None or not x.is_cuda or not torch.cuda.is_current_stream_capturing():
            # Eager steps are launch-bound on the host: switching streams would only add host time.
            y = proj(x)
            self.apply(layer, group, x, y)
            return y  # type: ignore[no-any-return]
        buf, weights_a, weights_b, ranks = self._operands(layer, group, x)
        main = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self.ops.lora_shrink(x, weights_a, self.meta, buf, self._shrink_ranks(layer, group))
        y = proj(x)
        main.wait_stream(self.stream)
        buf = self._gathered(group, buf)
        self.ops.lora_expand(buf, weights_b, self.meta, y, self.scales, ranks)
        return y  # type: ignore[no-any-return]

    def _operands(
        self, layer: int, group: int, x: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        modules = MODULE_GROUPS[group]
        weights_a = [self.a[m][layer] for m in modules]  # each [S, R, in]
        weights_b = [self.b[m][layer] for m in modules]  # each [S, O_n, R]
        buf = torch.empty(
            len(modules), x.shape[0], weights_a[0].shape[1], dtype=torch.float32, device=x.device
        )
        return buf, weights_a, weights_b, self.ranks[layer, group]  # ranks [S]

    def apply(self, layer: int, group: int, x: Tensor, y: Tensor) -> None:
        """y += LoRA delta of every module of `group` (its slices side by side in y). x [T, in]; y [T, sum O]."""
        if not self.active[layer][group]:
            return
        buf, weights_a, weights_b, ranks = self._operands(layer, group, x)
        self.ops.lora_shrink(x, weights_a, self.meta, buf, self._shrink_ranks(layer, group))
        buf = self._gathered(group, buf)
        self.ops.lora_expand(buf, weights_b, self.meta, y, self.scales, ranks)

    def _shrink_ranks(self, layer: int, group: int) -> Tensor:
        return (self.ranks if self.shrink_ranks is None else self.shrink_ranks)[layer, group]  # [S]

    def _gathered(self, group: int, buf: Tensor) -> Tensor:
        """buf [N, T, R_local] -> [N, T, R]: every rank's slice of a split shrink, in rank order."""
        if self.gather is None or group not in COLUMN_GROUPS:
            return buf
        return self.gather(buf)


# One launch per group: q/k/v share the attention input, gate/up the MLP input.
MODULE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)
QKV, O_PROJ, GATE_UP, DOWN = range(4)
# Column-parallel under tensor parallelism (output rows split): their shrink is what fully_sharded_loras
# splits over the ranks (engine/parallel/sharding.py).
COLUMN_GROUPS: tuple[int, ...] = (QKV, GATE_UP)
COLUMN_MODULES: tuple[str, ...] = tuple(m for g in COLUMN_GROUPS for m in MODULE_GROUPS[g])
LORA_MODULES: tuple[str, ...] = tuple(m for group in MODULE_GROUPS for m in group)
