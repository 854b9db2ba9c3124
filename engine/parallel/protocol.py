"""What rank 0 sends the workers: a fixed-size int64 header on the control group, then, per command, one
tensor on the data group. Workers run the commands in order, so a slot write sent before a step is in
place when that step runs.

header: [command, args..., pad] then from HEADER_FIXED on, the step's used adapter slots.
  STEP:   tokens, rows, width, num_logits, gather, num_segments, hidden_only, num_used | + the step
          input's packed buffer (engine/step_input.py)
  LOGITS: rows | + hidden states [rows, H]
  SLOT:   slot, nbytes, scaling (float64 bits), rank of each LORA_MODULES entry | + the adapter's bytes
  REPLAY: tokens, sequences, query_len, mask (-1: None, else bits), ahead, num_segments | + the packed
          buffer, filled for that graph bucket (engine/cuda_graphs.py)
  STOP
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.lora import LoRAAdapter, module_shapes
from engine.model_config import ModelConfig
from engine.ops import LORA_MODULES, MODULE_GROUPS

STOP, STEP, LOGITS, SLOT, REPLAY = 0, 1, 2, 3, 4
HEADER_FIXED = 16


def header(num_slots: int) -> Tensor:
    return torch.zeros(HEADER_FIXED + num_slots, dtype=torch.int64)


def mask_code(mask: tuple[bool, ...] | None) -> int:
    return -1 if mask is None else sum(1 << i for i, on in enumerate(mask) if on)


def mask_of(code: int) -> tuple[bool, ...] | None:
    return None if code < 0 else tuple(bool(code >> i & 1) for i in range(len(MODULE_GROUPS)))


def pack_adapter(slot: int, adapter: LoRAAdapter, head: Tensor) -> Tensor:
    """Fill `head` for a SLOT command; returns the adapter as one uint8 buffer (a copy: the adapter's
    own memory may go back to the CPU tier's pool before the workers get it)."""
    parts = [adapter.ranks]  # first: int32 at offset 0 keeps every later view aligned
    head.zero_()
    head[0], head[1] = SLOT, slot
    head[3] = torch.tensor([adapter.scaling], dtype=torch.float64).view(torch.int64)[0]
    for i, module in enumerate(LORA_MODULES):
        if module in adapter.a:
            head[4 + i] = adapter.a[module].shape[1]
            parts += [adapter.a[module], adapter.b[module]]
    flat = torch.cat([p.contiguous().reshape(-1).view(torch.uint8).cpu() for p in parts])
    head[2] = flat.numel()
    return flat


def unpack_adapter(head: Tensor, flat: Tensor, cfg: ModelConfig, dtype: torch.dtype) -> LoRAAdapter:
    """The whole adapter from a SLOT command's header and bytes (`cfg`: the whole model's config)."""
    shapes = module_shapes(cfg)
    layers, offset = cfg.num_layers, 0
    a: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}

    def take(shape: tuple[int, ...], kind: torch.dtype) -> Tensor:
        nonlocal offset
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=kind).element_size()
        t = flat[offset : offset + n].view(kind).view(shape)
        offset += n
        return t

    ranks = take((layers, len(MODULE_GROUPS)), torch.int32)
    for i, module in enumerate(LORA_MODULES):
        r = int(head[4 + i])
        if r:
            d_in, d_out = shapes[module]
            a[module] = take((layers, r, d_in), dtype)
            b[module] = take((layers, d_out, r), dtype)
    scaling = float(head[3:4].view(torch.float64)[0])
    rank = max((t.shape[1] for t in a.values()), default=0)
    return LoRAAdapter(content_hash="", rank=rank, scaling=scaling, a=a, b=b, ranks=ranks)
