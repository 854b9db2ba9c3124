"""Adapter slots under tensor parallelism: every rank holds its part of every slot.

The adapter cache (engine process, rank 0) writes a whole adapter; `ShardedSlots` writes rank 0's part
and queues the whole adapter for the workers, which get it (one broadcast) before the next step runs,
so a load reaches every rank before any forward can use its slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.lora import LoRAAdapter
from engine.lora_slots import LoRASlots, SlotCopy
from engine.parallel.sharding import Shard

if TYPE_CHECKING:
    from engine.parallel.driver import Workers


class ShardedSlots(LoRASlots):
    def __init__(
        self, shard: Shard, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device,
        workers: Workers,
    ) -> None:  # fmt: skip
        slot_rank, a_split = shard.lora_slot_args(max_rank)
        super().__init__(shard.local_config(), num_slots, slot_rank, dtype, device, a_split=a_split)
        self.shard = shard
        self.workers = workers

    def write(self, slot: int, adapter: LoRAAdapter) -> SlotCopy | None:
        copy = super().write(slot, self.shard.adapter(adapter))  # checks the slot first
        self.workers.queue_slot(slot, adapter)  # sent before the next command: before any step uses it
        return copy
