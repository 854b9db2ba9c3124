"""The device-resident adapter slots (`LoRASlots`) and page-locking adapters for their copies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.lora import LoRAAdapter, module_shapes
from engine.model_loader import ModelConfig
from engine.ops import MODULE_GROUPS


class LoRASlots:
    """The device-resident adapter slots: every module's A/B stacked over slots, padded to max_rank.

    Padding with zeros keeps the math exact, and a module an adapter does not target is all zeros with
    rank 0, so adapters with different ranks and target sets share one batch.
    """

    def __init__(
        self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        layers, s, r = cfg.num_layers, num_slots, max_rank
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        for module, (d_in, d_out) in module_shapes(cfg).items():
            self.a[module] = torch.zeros(layers, s, r, d_in, dtype=dtype, device=device)  # [L, S, R, in]
            self.b[module] = torch.zeros(layers, s, d_out, r, dtype=dtype, device=device)  # [L, S, out, R]
        self.scales = torch.zeros(s, dtype=torch.float32, device=device)  # [S]
        self.ranks = torch.zeros(layers, len(MODULE_GROUPS), s, dtype=torch.int32, device=device)  # [L, G, S]
        # Host copy of `ranks`, so a step can tell which launches it needs without a device sync.
        self.host_ranks = torch.zeros(layers, len(MODULE_GROUPS), s, dtype=torch.int32)
        # On CUDA, slot writes run on a side stream so that loading never stalls the running batch.
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def active_groups(self, slots: list[int]) -> list[list[bool]]:
        """[L][G]: does any of these slots have a non-zero rank in group g of layer l?"""
        if not slots:
            return [[False] * self.host_ranks.shape[1] for _ in range(self.host_ranks.shape[0])]
        return (self.host_ranks[:, :, slots].amax(dim=-1) > 0).tolist()  # type: ignore[no-any-return]

    def write(self, slot: int, adapter: LoRAAdapter) -> SlotCopy | None:
        """Copy `adapter` into `slot`. Returns the copy in flight (check it before use), or None when done."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        self.host_ranks[:, :, slot] = adapter.ranks
        if self._stream is None:
            self._write(slot, adapter)
            return None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            self._write(slot, adapter)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self._stream)
        return SlotCopy(start, end)

    def order_after(self, copy: SlotCopy) -> None:
        """Make the compute stream wait for this slot copy (no host wait): work launched from now on, on
        this thread's current stream, sees the slot's new contents."""
        torch.cuda.current_stream(self.device).wait_event(copy.end)

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for module in self.a:
            self.a[module][:, slot].zero_()
            self.b[module][:, slot].zero_()
            if module in adapter.a:
                r = adapter.a[module].shape[1]
                self.a[module][:, slot, :r].copy_(adapter.a[module], non_blocking=True)
                self.b[module][:, slot, :, :r].copy_(adapter.b[module], non_blocking=True)
        self.ranks[:, :, slot].copy_(adapter.ranks, non_blocking=True)
        self.scales[slot] = adapter.scaling


@dataclass(slots=True)
class SlotCopy:
    """A slot copy on the side stream: CUDA events around it, so its device time is known exactly (the
    host may only look at it a step later)."""

    start: Any
    end: Any

    def query(self) -> bool:
        return bool(self.end.query())

    def synchronize(self) -> None:
        self.end.synchronize()

    def seconds(self) -> float:
        return float(self.start.elapsed_time(self.end)) / 1e3


def pin_adapter(adapter: LoRAAdapter) -> LoRAAdapter:
    """Page-locked, so CPU->GPU copies can run asynchronously (CUDA hosts only). An adapter from
    `load_adapter` is pinned already; otherwise each buffer under its tensors is copied once into pinned
    memory and the views are rebuilt on it."""
    if not torch.cuda.is_available():
        return adapter
    pinned: dict[int, torch.UntypedStorage] = {}

    def pin(t: Tensor) -> Tensor:
        if t.is_pinned():
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in pinned:
            pinned[storage.data_ptr()] = storage.pin_memory()
        out = torch.empty(0, dtype=t.dtype)
        return out.set_(pinned[storage.data_ptr()], t.storage_offset(), t.shape, t.stride())

    adapter.a = {m: pin(t) for m, t in adapter.a.items()}
    adapter.b = {m: pin(t) for m, t in adapter.b.items()}
    adapter.ranks = pin(adapter.ranks)
    return adapter
