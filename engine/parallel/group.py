"""The collectives of one tensor-parallel group: a process group made directly (no torch.distributed
global state, so several engines, and the tests' TP=1 and TP=2 engines, live in one process), NCCL on
CUDA and gloo on the CPU, over a TCP store on the loopback interface.

Two groups: `device` carries tensors the forward reads (NCCL on CUDA), `control` carries the small step
headers on the CPU (gloo), so a worker learns what to run without a device sync. On the CPU they are one.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

HOST = "127.0.0.1"


def make_store(rank: int, size: int, port: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 listens (port 0: a free one, read back from `.port`); the others connect."""
    return dist.TCPStore(
        HOST, port, size, rank == 0, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def _gloo(store: Any, rank: int, size: int, timeout_s: float) -> Any:
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
    return dist.ProcessGroupGloo(store, rank, size, opts)


class TPGroup:
    """Rank `rank` of `size`; every collective waits for completion (or raises: a peer that died closes
    its sockets, and gloo fails the call at once; a peer that hangs fails it after `timeout_s`)."""

    def __init__(self, store: Any, rank: int, size: int, device: torch.device, timeout_s: float) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.control = _gloo(dist.PrefixStore("control", store), rank, size, timeout_s)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = datetime.timedelta(seconds=timeout_s)
            self.data: Any = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, opts)
        else:
            self.data = self.control

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place; returns t."""
        self.data.allreduce([t]).wait()
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's t to every rank, in place (a device tensor: the data group)."""
        self.data.broadcast(t, 0).wait()
        return t

    def broadcast_header(self, t: Tensor) -> Tensor:
        """A small int64 CPU tensor from rank 0 (the control group)."""
        self.control.broadcast(t, 0).wait()
        return t

    def gather_last_dim(self, t: Tensor) -> Tensor:
        """Each rank's [..., n] part -> on rank 0 the [..., size * n] concatenation; others get t back."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        t = t.contiguous()
        if self.rank != 0:
            self.data.gather([], [t], opts).wait()
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.data.gather([parts], [t], opts).wait()
        return torch.cat(parts, dim=-1)

    def all_gather_last_dim(self, t: Tensor) -> Tensor:
        """Each rank's [..., n] part -> on every rank the [..., size * n] concatenation in rank order
        (fully_sharded_loras: the column-parallel shrink's rank slices)."""
        t = t.contiguous()
        # One flat all-gather (allgather_into_tensor: NCCL's capturable path), ranks stacked in dim 0.
        out = t.new_empty(self.size * t.shape[0], *t.shape[1:])  # [size * d0, ..., n]
        self.data._allgather_base(out, t).wait()
        parts = out.view(self.size, *t.shape)  # [size, ..., n]
        return parts.movedim(0, -2).reshape(*t.shape[:-1], self.size * t.shape[-1])  # [..., size * n]

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. KV blocks: every rank must hold the same count)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]
        self.control.allreduce([t], opts).wait()
        return int(t.item())

    def abort(self) -> None:
        """Fail collectives in flight (NCCL would otherwise wait forever for a peer that died)."""
        for pg in {id(self.data): self.data, id(self.control): self.control}.values():
            abort = getattr(pg, "abort", None)
            if abort is not None:
                with contextlib.suppress(Exception):
                    abort()
