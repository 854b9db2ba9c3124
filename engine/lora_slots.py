"""The device-resident adapter slots (`LoRASlots`) and page-locking adapters for their copies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.lora import LoRAAdapter, module_shapes, stacked_sizes
from engine.model_loader import ModelConfig
from engine.ops import COLUMN_GROUPS, COLUMN_MODULES, MODULE_GROUPS


class LoRASlots:
    """The device-resident adapter slots: every module's A/B stacked over slots, padded to max_rank.

    Padding with zeros keeps the math exact, and a module an adapter does not target is all zeros with
    rank 0, so adapters with different ranks and target sets share one batch.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        batched: bool = False,
        a_split: tuple[int, int] | None = None,
    ) -> None:
        """`batched`: write a slot with one host -> device copy of the adapter's whole stacked buffer into
        a device staging buffer, then device-side copies (see `_write_batched`).
        `a_split` (k, n): tensor parallelism's fully_sharded_loras: the written adapters' column-parallel
        A (q/k/v/gate/up) are rows [k * n, (k + 1) * n) of the whole A (engine/parallel/sharding.py), so
        those A hold n rows and `shrink_ranks` counts this rank's rows of each slot."""
        assert a_split is None or not batched, "a split A is written row by row (_write)"
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.a_split = a_split
        layers, s, r = cfg.num_layers, num_slots, max_rank
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        for module, (d_in, d_out) in module_shapes(cfg).items():
            r_a = a_split[1] if a_split is not None and module in COLUMN_MODULES else r
            self.a[module] = torch.zeros(layers, s, r_a, d_in, dtype=dtype, device=device)  # [L, S, R_a, in]
            self.b[module] = torch.zeros(layers, s, d_out, r, dtype=dtype, device=device)  # [L, S, out, R]
        self.scales = torch.zeros(s, dtype=torch.float32, device=device)  # [S]
        self.ranks = torch.zeros(layers, len(MODULE_GROUPS), s, dtype=torch.int32, device=device)  # [L, G, S]
        # The shrink's ranks: this rank's rows of A per slot (split A), else the same tensor as `ranks`.
        self.shrink_ranks = self.ranks if a_split is None else torch.zeros_like(self.ranks)  # [L, G, S]
        # Host copy of `ranks`, so a step can tell which launches it needs without a device sync.
        self.host_ranks = torch.zeros(layers, len(MODULE_GROUPS), s, dtype=torch.int32)
        # On CUDA, slot writes run on a side stream so that loading never stalls the running batch.
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        # Highest rank ever written per (slot, module) since it was last zeroed: rows above it are zero
        # already, so the batched write zeroes only what an earlier, larger adapter left there.
        self._dirty = [dict.fromkeys(self.a, 0) for _ in range(num_slots)]
        self._staging: Tensor | None = None
        if batched and num_slots:
            full = dict.fromkeys(self.a, max_rank)
            nbytes = stacked_sizes(full, module_shapes(cfg), layers, dtype)[1]
            self._staging = torch.empty(-(-nbytes // 8) * 8, dtype=torch.uint8, device=device)

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
            self._write_any(slot, adapter)
            return None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            self._write_any(slot, adapter)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self._stream)
        return SlotCopy(start, end)

    def order_after(self, copy: SlotCopy) -> None:
        """Make the compute stream wait for this slot copy (no host wait): work launched from now on, on
        this thread's current stream, sees the slot's new contents."""
        torch.cuda.current_stream(self.device).wait_event(copy.end)

    def fence(self) -> Any:
        """An event after every slot copy issued so far (None on CPU): a CPU buffer those copies read may
        be reused once it has passed (engine/pinned_pool.py)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def _write_any(self, slot: int, adapter: LoRAAdapter) -> None:
        if self._staging is None or not self._write_batched(slot, adapter):
            self._write(slot, adapter)
            self._dirty[slot] = dict.fromkeys(self.a, self.max_rank)  # unknown to the batched path: all

    def _write_batched(self, slot: int, adapter: LoRAAdapter) -> bool:
        """One host -> device copy of the bytes under every A/B and the ranks (they are views of one
        buffer when load_adapter or a loader process made the adapter), then per targeted module one
        device copy into A and one into B; zeroing only rows an earlier adapter left non-zero. The H200
        run of 2026-12-03 issued ~30 host -> device copies and zero fills per adapter instead.
        False (nothing written) when the adapter's tensors are not views of one contiguous span."""
        assert self._staging is not None
        tensors = [*adapter.a.values(), *adapter.b.values(), adapter.ranks]
        storage = adapter.ranks.untyped_storage()
        if not all(
            t.is_contiguous() and t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors
        ):
            return False
        offsets = [int(t.storage_offset()) * t.element_size() for t in tensors]
        low = min(offsets)
        high = max(o + t.nbytes for o, t in zip(offsets, tensors, strict=True))
        if high - low > self._staging.numel():
            return False
        source = torch.empty(0, dtype=torch.uint8).set_(storage, low, (high - low,), (1,))
        self._staging[: high - low].copy_(source, non_blocking=True)

        def on_device(t: Tensor, offset: int) -> Tensor:
            assert self._staging is not None
            return self._staging[offset - low : offset - low + t.nbytes].view(t.dtype).view(t.shape)

        device = [on_device(t, o) for t, o in zip(tensors, offsets, strict=True)]
        a_dev = dict(zip(adapter.a, device, strict=False))
        b_dev = dict(zip(adapter.b, device[len(adapter.a) :], strict=False))
        dirty = self._dirty[slot]
        for module in self.a:
            a_slot, b_slot = self.a[module][:, slot], self.b[module][:, slot]
            r = a_dev[module].shape[1] if module in a_dev else 0
            if dirty[module] > r:
                a_slot[:, r:].zero_()
                b_slot[:, :, r:].zero_()
            if r:
                a_slot[:, :r].copy_(a_dev[module])
                b_slot[:, :, :r].copy_(b_dev[module])
            dirty[module] = r
        self.ranks[:, :, slot].copy_(device[-1])
        self.scales[slot] = adapter.scaling
        return True

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for module in self.a:
            self.a[module][:, slot].zero_()
            self.b[module][:, slot].zero_()
            if module in adapter.a:  # A's rows and B's columns differ when A is split (a_split)
                r_a, r_b = adapter.a[module].shape[1], adapter.b[module].shape[2]
                self.a[module][:, slot, :r_a].copy_(adapter.a[module], non_blocking=True)
                self.b[module][:, slot, :, :r_b].copy_(adapter.b[module], non_blocking=True)
        self.ranks[:, :, slot].copy_(adapter.ranks, non_blocking=True)
        if self.a_split is not None:  # this rank's rows of each column-parallel group's rank
            k, n = self.a_split
            local = adapter.ranks.clone()  # [L, G]
            for g in COLUMN_GROUPS:
                local[:, g] = (adapter.ranks[:, g] - k * n).clamp(0, n)
            self.shrink_ranks[:, :, slot].copy_(local)
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
