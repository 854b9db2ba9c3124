"""A tensor-parallel worker process (ranks 1..N-1): its part of the model, KV cache and adapter slots,
running what rank 0 sends (engine/parallel/protocol.py) until STOP.

It exits, leaving nothing behind, when rank 0's process goes away: a collective with it fails, and a
thread watching the pipe to the parent ends the process when the pipe closes (the parent died, even by
SIGKILL, which runs no atexit hook).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from types import SimpleNamespace
from typing import Any

import torch

from engine.config import EngineConfig
from engine.lora_slots import LoRASlots
from engine.parallel import protocol
from engine.parallel.group import TPGroup, make_store
from engine.parallel.loading import load_rank, rank_device
from engine.parallel.sharding import Shard
from engine.step_input import Layout


def worker_main(
    config: EngineConfig, rank: int, size: int, port: int, conn: Any, timeout_s: float, weights: Any = None
) -> None:
    """Process entry point (spawned): never returns; exit code 0 after STOP, 1 after an error."""
    threading.Thread(target=_exit_with_parent, args=(conn,), daemon=True).start()
    started = time.monotonic()
    try:
        device = rank_device(config, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks share the host's cores: each its share, not all of them each
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        group = TPGroup(make_store(rank, size, port, timeout_s), rank, size, device, timeout_s)
        loaded, shard = load_rank(config, group, with_tokenizer=False, weights=weights)
        slot_rank, a_split = shard.lora_slot_args(config.max_lora_rank)
        slots = LoRASlots(loaded.config, config.max_loras, slot_rank, loaded.dtype, device, a_split=a_split)
        from engine.model_runner import ModelRunner

        runner = ModelRunner(config, loaded, SimpleNamespace(slots=slots), group=group)  # type: ignore[arg-type]
        conn.send(("ready", runner.start_report(time.monotonic() - started)))
        _serve(runner, slots, shard, group)
    except BaseException as exc:
        with contextlib.suppress(OSError, EOFError):
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        os._exit(1)
    os._exit(0)


def _exit_with_parent(conn: Any) -> None:
    try:
        while True:
            conn.recv()  # the parent never sends: this returns only by EOF (the parent's end closed)
    except (EOFError, OSError):
        os._exit(0)


@torch.inference_mode()
def _serve(runner: Any, slots: LoRASlots, shard: Shard, group: TPGroup) -> None:
    head = protocol.header(slots.num_slots)
    model = runner.model.model
    while True:
        group.broadcast_header(head)
        command = int(head[0])
        if command == protocol.STOP:
            return
        if command == protocol.STEP:
            group.broadcast(runner.input.packed)
            tokens, rows, width, num_logits, gather, segments, hidden_only, num_used = head[1:9].tolist()
            layout = Layout(tokens, rows, width, num_logits, bool(gather), segments)
            used = head[protocol.HEADER_FIXED : protocol.HEADER_FIXED + num_used].tolist()
            runner.forward_layout(layout, used, bool(hidden_only))
        elif command == protocol.REPLAY:
            group.broadcast(runner.input.packed)
            tokens, seqs, q, mask, ahead, segments = head[1:7].tolist()
            runner.input.num_segments = segments
            if runner.graphs is None:  # rank 0 replays uncaptured graphs (CPU tests): mirror them
                runner.graphs = runner.make_graphs(capture=False)
            if runner.graphs.replay((tokens, seqs, q, protocol.mask_of(mask)), bool(ahead)) is None:
                raise RuntimeError(f"graph capture failed (key {(tokens, seqs, q, mask)})")
        elif command == protocol.LOGITS:
            hidden = torch.empty(
                int(head[1]), shard.cfg.hidden_size, dtype=runner.model.dtype, device=group.device
            )
            model.compute_logits(group.broadcast(hidden))
        elif command == protocol.SLOT:
            flat = group.broadcast(torch.empty(int(head[2]), dtype=torch.uint8, device=group.device))
            adapter = protocol.unpack_adapter(head, flat, shard.cfg, runner.model.dtype)
            copy = slots.write(int(head[1]), shard.adapter(adapter))
            if copy is not None:
                slots.order_after(copy)
        else:
            raise RuntimeError(f"unknown command {command}")
