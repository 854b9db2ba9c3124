"""Compile the multi-LoRA kernels' launch variants when the engine starts, not inside a serving step.

Triton compiles a kernel variant the first time a launch needs it, on the launching thread. CUDA graph
capture covers decode; eager steps (prefills, chunks, mixed steps) pick their token block size from the
tokens per adapter, and each new choice compiled during serving (H200, 2026-12-03, workload e: every
mid-run compile was the LoRA shrink; the slowest steps held two compiles each, 0.7-1.1 s). Here one
launch of each group's shrink and expand runs per (tokens, adapters) shape below, which together reach
every token block size (4, 16, 32, 64) with a token count that is 1, a multiple of 16 and neither, on
the engine's own slot tensors (zeros at start: nothing is written that a request could read).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.ops import MODULE_GROUPS, LoRABatch

log = logging.getLogger(__name__)

# (tokens, adapters): tokens per adapter 1-2 -> blocks of 4, 3-16 -> 16, 17-32 -> 32, more -> 64.
WARM_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1), (2, 1), (16, 16), (24, 3), (32, 4), (48, 2), (50, 2), (128, 2), (130, 2),
)  # fmt: skip


@torch.inference_mode()
def warm_lora_kernels(slots: Any, ops: Any, device: torch.device, gather: Any = None) -> int:
    """Run every module group's LoRA launches once per shape of WARM_SHAPES on layer 0 of `slots`
    (engine/lora_slots.py). Returns the launches made (0 without adapter slots). gather: the tensor-
    parallel all-gather of fully_sharded_loras (every rank warms the same shapes in the same order)."""
    if slots.num_slots == 0:
        return 0
    start, launches = time.perf_counter(), 0
    max_segments = max(slots.num_slots, 1)
    layers = slots.ranks.shape[0]
    for tokens, adapters in WARM_SHAPES:
        adapters = min(adapters, slots.num_slots, tokens)
        token_slots = (torch.arange(tokens) * adapters // tokens).to(torch.int32).to(device)
        meta = ops.make_lora_meta(token_slots, max_segments)
        active = [[True] * len(MODULE_GROUPS) for _ in range(layers)]
        batch = LoRABatch(
            meta, slots.a, slots.b, slots.scales, slots.ranks, ops, active, None, slots.shrink_ranks, gather
        )
        for group, modules in enumerate(MODULE_GROUPS):
            d_in = slots.a[modules[0]].shape[-1]
            width = sum(slots.b[m].shape[-2] for m in modules)
            x = torch.zeros(tokens, d_in, dtype=slots.dtype, device=device)
            y = torch.zeros(tokens, width, dtype=slots.dtype, device=device)
            batch.apply(0, group, x, y)
            launches += 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.info("LoRA kernels warmed: %d launches in %.1f s", launches, time.perf_counter() - start)
    return launches
