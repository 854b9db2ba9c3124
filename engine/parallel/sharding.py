"""Which part of every weight and adapter tensor one tensor-parallel rank holds (Megatron's layout).

Column-parallel (output rows split): q/k/v and gate/up; row-parallel (input columns split): o and down,
whose partial outputs one all-reduce sums. Query heads split evenly; KV heads too, or, when there are
fewer KV heads than ranks, each KV head is replicated on the ranks whose query heads read it. The
vocabulary (embedding and untied or tied head) is split in rows, padded with zero rows to a multiple of
the ranks. LoRA follows S-LoRA: A replicated and B split by output rows for column-parallel modules; A
split by input columns and B whole for row-parallel ones, so each rank's expand of its partial shrink
is a partial delta that the base all-reduce sums with the base output (no extra collective).
With fully_sharded_loras (`lora_rows` > 0) a column-parallel module's A is split too, by rank rows: rank k
holds rows [k * lora_rows, (k + 1) * lora_rows) of A padded to max_lora_rank rounded up to a multiple
of the ranks; its shrink's [T, lora_rows] slices, all-gathered in rank order, are the whole [T, R] shrink.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.lora import LoRAAdapter
from engine.model_config import ModelConfig


def check_shardable(cfg: ModelConfig, size: int) -> None:
    """ValueError (naming tensor_parallel_size) when `cfg` cannot be split over `size` ranks."""
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        problems.append(f"{cfg.num_kv_heads} KV heads (neither a multiple nor a divisor)")
    if cfg.intermediate_size % size:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's {', '.join(problems)}")


@dataclass(frozen=True, slots=True)
class Shard:
    """Rank `rank` of `size` over the full model config `cfg`."""

    cfg: ModelConfig
    rank: int
    size: int
    lora_rows: int = 0  # fully_sharded_loras: rows of a column-parallel A per rank; 0: A replicated

    @property
    def heads(self) -> tuple[int, int]:
        """[start, end) of this rank's query heads."""
        n = self.cfg.num_heads // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """[start, end) of this rank's KV heads: the ones its query heads read."""
        kv, size = self.cfg.num_kv_heads, self.size
        if kv >= size:
            n = kv // size
            return self.rank * n, (self.rank + 1) * n
        head = self.rank // (size // kv)
        return head, head + 1

    @property
    def inter(self) -> tuple[int, int]:
        n = self.cfg.intermediate_size // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def vocab_rows(self) -> int:
        """Embedding / head rows per rank (the vocabulary padded to a multiple of the ranks)."""
        return -(-self.cfg.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    def local_config(self) -> ModelConfig:
        """The config this rank's modules are built from: its heads and MLP width (vocab stays whole)."""
        (h0, h1), (k0, k1), (i0, i1) = self.heads, self.kv_heads, self.inter
        return dataclasses.replace(
            self.cfg, num_heads=h1 - h0, num_kv_heads=k1 - k0, intermediate_size=i1 - i0
        )

    # ---- base weights (Hugging Face names, before q/k/v and gate/up are fused) ----
    def weight(self, name: str, t: Tensor) -> Tensor:
        """This rank's part of the checkpoint tensor `name`; norms and other small tensors whole."""
        d, cfg = self.cfg.head_dim, self.cfg
        q_rows = _scaled(self.heads, d)
        kv_rows = _scaled(self.kv_heads, d)
        parts = name.rsplit(".", 2)
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        if module == "q_proj":
            return _rows(t, q_rows)
        if module in ("k_proj", "v_proj"):
            return _rows(t, kv_rows)
        if module == "qkv_proj":  # fused in the checkpoint (Phi-3): each part split on its own
            q, k, v = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
            return torch.cat((_rows(q, q_rows), _rows(k, kv_rows), _rows(v, kv_rows)))
        if module in ("gate_proj", "up_proj"):
            return _rows(t, self.inter)
        if module == "gate_up_proj":
            gate, up = t.chunk(2, dim=0)
            return torch.cat((_rows(gate, self.inter), _rows(up, self.inter)))
        if module in ("o_proj", "down_proj"):
            if kind == "bias":  # added once: by rank 0, the others add zeros before the all-reduce
                return t if self.rank == 0 else torch.zeros_like(t)
            return _cols(t, q_rows if module == "o_proj" else self.inter)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = self.vocab_rows
            part = t[self.vocab_start : self.vocab_start + rows]
            if part.shape[0] < rows:  # the last rank's padding rows: zero logits, never looked up
                part = torch.cat((part, part.new_zeros(rows - part.shape[0], *part.shape[1:])))
            return part.contiguous()
        return t

    # ---- adapters ----
    def lora_slot_args(self, max_rank: int) -> tuple[int, tuple[int, int] | None]:
        """(max_rank, a_split) of this rank's LoRASlots: with fully_sharded_loras (lora_rows) the slots'
        rank is max_rank rounded up to a multiple of the ranks (B's columns, the gathered shrink) and A's
        column-parallel rows are this rank's slice; else max_rank and A whole."""
        if not self.lora_rows:
            return max_rank, None
        return self.lora_rows * self.size, (self.rank, self.lora_rows)

    def adapter(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """This rank's part of a whole adapter (a [L, r, in], b [L, out, r] per module)."""
        d = self.cfg.head_dim
        b_rows = {
            "q_proj": _scaled(self.heads, d),
            "k_proj": _scaled(self.kv_heads, d),
            "v_proj": _scaled(self.kv_heads, d),
            "gate_proj": self.inter,
            "up_proj": self.inter,
        }
        a_cols = {"o_proj": _scaled(self.heads, d), "down_proj": self.inter}
        a, b = dict(adapter.a), dict(adapter.b)
        for module, (lo, hi) in b_rows.items():
            if module in b:
                b[module] = b[module][:, lo:hi].contiguous()
        for module, (lo, hi) in a_cols.items():
            if module in a:
                a[module] = a[module][:, :, lo:hi].contiguous()
        if self.lora_rows:  # rows past the adapter's rank are zeros in the slot: cut only real rows
            lo = self.rank * self.lora_rows
            for module in b_rows:
                if module in a:
                    a[module] = a[module][:, lo : lo + self.lora_rows].contiguous()  # [L, <= lora_rows, in]
        return dataclasses.replace(adapter, a=a, b=b)


def lora_rows(max_lora_rank: int, size: int, fully_sharded: bool) -> int:
    """Rows of a column-parallel A per rank (max_lora_rank rounded up to a multiple of `size`, split);
    0 when A stays replicated (fully_sharded_loras off, or one rank)."""
    return -(-max_lora_rank // size) if fully_sharded and size > 1 else 0


def _scaled(span: tuple[int, int], by: int) -> tuple[int, int]:
    return span[0] * by, span[1] * by


def _rows(t: Tensor, span: tuple[int, int]) -> Tensor:
    return t[span[0] : span[1]].contiguous()


def _cols(t: Tensor, span: tuple[int, int]) -> Tensor:
    return t[:, span[0] : span[1]].contiguous()
