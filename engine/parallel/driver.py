"""The engine process's side of tensor parallelism: it is rank 0 (its own part of the model, KV cache
and slots, and the only rank that samples), and it drives ranks 1..N-1 in worker processes.

Rank 0 lives in the engine process rather than in a worker because the sampler, async scheduling and
prompt logprobs then read rank 0's logits where they are, with no extra hop per step; the scheduler, block
manager and adapter cache stay beside it, as with one GPU.

A worker that dies is noticed three ways, whichever comes first: gloo fails a collective in flight when
the peer's socket closes; a watcher thread waiting on the workers' process sentinels marks the group dead
and aborts the groups (NCCL would otherwise wait for the lost peer); and every command checks the mark
first. Each way ends in EngineFault, which the async engine turns into a dead engine (503, /ready fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from engine.config import EngineConfig
from engine.lora import LoRAAdapter
from engine.parallel import protocol
from engine.parallel.group import TPGroup, make_store
from engine.parallel.worker import worker_main
from engine.step_guard import EngineFault
from engine.step_input import Layout

log = logging.getLogger(__name__)

# Seconds a collective may wait: long enough for every rank to load a large model before the first one
# (the KV block count), short enough that a hung (not dead) worker fails the engine; a dead one fails it
# at once.
COLLECTIVE_TIMEOUT_S = 300.0
# Seconds close() waits for a worker to exit on its own before it is terminated, then killed.
EXIT_WAIT_S = 5.0


class Workers:
    """Ranks 1..size-1 and the group they share with this process (rank 0)."""

    def __init__(
        self, config: EngineConfig, device: torch.device, num_slots: int, weights: Any = None
    ) -> None:
        size = config.tensor_parallel_size
        self.size = size
        self.dead: str | None = None
        # deque: appends (adapter cache) and pops (the step) are each atomic, whatever thread writes a slot
        self._slot_writes: deque[tuple[Tensor, Tensor]] = deque()
        self._head = protocol.header(num_slots)
        self.sent: Counter[int] = Counter()  # commands sent, by protocol number (tests, debugging)
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
        store = make_store(0, size, 0, COLLECTIVE_TIMEOUT_S)
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(config, rank, size, store.port, theirs, COLLECTIVE_TIMEOUT_S, weights),
                name=f"loraplex-tp-rank{rank}",
                daemon=True,  # multiprocessing's atexit hook ends it with us
            )
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self._closed = threading.Event()
        # Garbage collection and interpreter exit end the workers too, without close() being called.
        self._finalizer = weakref.finalize(self, _end_processes, list(self.procs), list(self.conns))
        self._serving = False  # every worker reported ready and waits for commands (close() may send STOP)
        try:
            self.group = TPGroup(store, 0, size, device, COLLECTIVE_TIMEOUT_S)
        except Exception as exc:
            errors = self._worker_errors()  # before the pipes close
            self._finalizer()
            raise RuntimeError(f"tensor-parallel workers did not join: {errors or exc}") from exc
        # The thread holds only a weak reference, so an engine dropped without close() is still collected.
        self._watcher = threading.Thread(
            target=_watch, args=(weakref.ref(self), [p.sentinel for p in self.procs], self._closed),
            name="loraplex-tp-watch", daemon=True,
        )  # fmt: skip
        self._watcher.start()

    # ---- start-up ----
    def wait_ready(self, own_report: dict[str, float]) -> None:
        """Every worker's start-up report (or its error), then one log line per rank."""
        reports = [own_report]
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(COLLECTIVE_TIMEOUT_S):
                raise RuntimeError(f"tensor-parallel rank {rank} sent no start-up report")
            kind, payload = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {payload}")
            reports.append(payload)
        self._serving = True
        for rank, r in enumerate(reports):
            log.info(
                "tensor-parallel rank %d/%d: weights %.1f MiB, KV cache %.1f MiB (%d blocks), adapter slots "
                "%.1f MiB, device memory in use %.1f MiB, started in %.1f s",
                rank, self.size, r["weights_mib"], r["kv_mib"], int(r["kv_blocks"]), r["slots_mib"],
                r["device_used_mib"], r["seconds"],
            )  # fmt: skip
        self.reports = reports

    # ---- commands ----
    def queue_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """An adapter written into `slot` on rank 0: sent before the next command."""
        head = self._head.clone()
        self._slot_writes.append((head, protocol.pack_adapter(slot, adapter, head)))

    def step(self, packed: Tensor, layout: Layout, used: list[int], hidden_only: bool) -> None:
        """Send one step: its header, then the step input's packed buffer (rank 0's, filled)."""
        self._send_slot_writes()
        head = self._head
        head.zero_()
        head[0] = protocol.STEP
        head[1:9] = torch.tensor([
            layout.tokens, layout.rows, layout.width, layout.num_logits, int(layout.gather),
            layout.num_segments, int(hidden_only), len(used),
        ])  # fmt: skip
        head[protocol.HEADER_FIXED : protocol.HEADER_FIXED + len(used)] = torch.tensor(
            used, dtype=torch.int64
        )
        self._send(head, packed)

    def replay(self, packed: Tensor, key: Any, ahead: bool, num_segments: int) -> None:
        """Send a graph replay: the bucket rank 0 picked (cuda_graphs.GraphKey), then the packed buffer
        filled for it."""
        self._send_slot_writes()
        tokens, seqs, q, mask = key
        head = self._head
        head.zero_()
        head[0] = protocol.REPLAY
        head[1:7] = torch.tensor([tokens, seqs, q, protocol.mask_code(mask), int(ahead), num_segments])
        self._send(head, packed)

    def logits(self, hidden: Tensor) -> None:
        """Send hidden rows [R, H] whose logits every rank computes its part of."""
        self._send_slot_writes()
        head = self._head
        head.zero_()
        head[0], head[1] = protocol.LOGITS, hidden.shape[0]
        self._send(head, hidden.contiguous())

    def _send_slot_writes(self) -> None:
        while self._slot_writes:
            head, flat = self._slot_writes.popleft()
            self._send(head, flat.to(self.group.device))

    def _send(self, head: Tensor, payload: Tensor) -> None:
        self.check()
        self.sent[int(head[0])] += 1
        try:
            self.group.broadcast_header(head)
            self.group.broadcast(payload)
        except Exception as exc:
            raise self.fault(exc) from exc

    # ---- failure ----
    def check(self) -> None:
        """EngineFault when a worker has died (or the group was closed)."""
        if self.dead is None:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.exitcode is not None:
                    self.dead = f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
        if self.dead is not None:
            raise EngineFault(self.dead)

    @contextlib.contextmanager
    def in_step(self) -> Iterator[None]:
        """Rank 0's part of a step the workers were sent: any failure in it is the engine's (`fault`)."""
        try:
            yield
        except Exception as exc:
            raise self.fault(exc) from exc

    def fault(self, exc: BaseException) -> EngineFault:
        """The EngineFault for an exception out of a collective (or of a forward between collectives:
        the ranks are then out of step, and no later step can be trusted)."""
        time.sleep(0.05)  # let a dying worker's exit code show, for a clearer message
        try:
            self.check()
        except EngineFault as dead:
            errors = self._worker_errors()
            return EngineFault(f"{dead}{': ' + errors if errors else ''}")
        self.dead = f"tensor-parallel step failed: {type(exc).__name__}: {exc}"
        return EngineFault(self.dead)

    def _worker_errors(self) -> str:
        """First lines of the errors workers sent (they send one before exiting on a failure)."""
        errors = []
        for conn in self.conns:
            try:
                while conn.poll(0):
                    kind, payload = conn.recv()
                    if kind == "error":
                        errors.append(str(payload).splitlines()[0])
            except (EOFError, OSError):
                continue
        return "; ".join(errors)

    def _lost(self, ready: list[Any]) -> None:
        """Called by the watcher thread when worker sentinels fire."""
        for rank, proc in enumerate(self.procs, start=1):
            if proc.sentinel in ready:
                proc.join(timeout=1.0)  # its sentinel fires a moment before it can be reaped
                if self.dead is None:
                    self.dead = f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
        log.error("%s: the engine cannot run any more steps", self.dead)
        if self.group.device.type == "cuda":
            self.group.abort()  # NCCL: fail the collective rank 0 may be waiting in

    # ---- shutdown ----
    def close(self) -> None:
        """STOP to the workers, then wait for them; any left after EXIT_WAIT_S are terminated, then killed."""
        if self._closed.is_set():
            return
        self._closed.set()
        # Before start-up ends the workers may be inside another collective: no STOP then, just the ending.
        if self._serving and self.dead is None and all(p.exitcode is None for p in self.procs):
            head = self._head
            head.zero_()
            head[0] = protocol.STOP
            try:
                self.group.broadcast_header(head)
            except Exception:
                log.warning("tensor-parallel workers did not take STOP; ending them")
        self.dead = self.dead or "tensor-parallel workers were shut down"
        deadline = time.monotonic() + EXIT_WAIT_S
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._finalizer()  # any still running: terminated, then killed
        self._watcher.join(timeout=2.0)


def _watch(workers: weakref.ref[Workers], sentinels: list[Any], closed: threading.Event) -> None:
    while not closed.is_set():
        ready = multiprocessing.connection.wait(sentinels, timeout=0.5)
        owner = workers()
        if owner is None:
            return
        if ready and not closed.is_set():
            owner._lost(list(ready))
            return
        del owner


def _end_processes(procs: list[Any], conns: list[Any]) -> None:
    """Without STOP (garbage collection, interpreter exit, or after close()'s wait): end them now."""
    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
            proc.join(timeout=2.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(timeout=2.0)
    for conn in conns:
        conn.close()


def build(config: EngineConfig, adapter_loader: Any = None, weights: Any = None) -> tuple[Any, Any, Any]:
    """(the whole model's LoadedModel for the engine, rank 0's ModelRunner, the AdapterCache) with the
    workers started and ready; the runner owns them (ModelRunner.close). weights: a WeightSource
    (engine/parallel/loading.py) instead of the folder's safetensors (benchmarks' random weights)."""
    from engine.adapter_setup import cache_for_model
    from engine.model_loader import config_json, load_config
    from engine.model_runner import ModelRunner
    from engine.parallel.loading import load_rank, rank_device
    from engine.parallel.sharding import check_shardable
    from engine.parallel.slots import ShardedSlots

    started = time.monotonic()
    full = load_config(config.model)
    check_shardable(full, config.tensor_parallel_size)  # before any process starts
    if "quantization_config" in config_json(config.model):
        raise ValueError("tensor_parallel_size > 1 does not load FP8 checkpoints yet (quantization_config)")
    device = rank_device(config, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's communicator binds the current device
    workers = Workers(config, device, config.max_loras, weights)
    cache = None
    try:
        local, shard = load_rank(config, workers.group, with_tokenizer=True, weights=weights)
        whole = dataclasses.replace(local, config=full)
        slots = ShardedSlots(shard, config.max_loras, config.max_lora_rank, local.dtype, device, workers)
        cache = cache_for_model(config, whole, adapter_loader, slots=slots)
        runner = ModelRunner(config, local, cache, group=workers.group)
        runner.workers = workers
        workers.wait_ready(runner.start_report(time.monotonic() - started))
    except BaseException as exc:
        errors = workers._worker_errors()  # e.g. a worker's load failed, and rank 0's next collective
        workers.close()
        if cache is not None:
            cache.close()
        if errors:
            raise RuntimeError(f"tensor-parallel start-up failed: {errors}") from exc
        raise
    return whole, runner, cache
