"""The engine tier: a Ray Serve deployment whose every replica holds one AsyncLLMEngine.

Routing by adapter is Serve's model multiplexing: a request's `multiplexed_model_id` is its adapter's
content hash, and `_adapter` below (`@serve.multiplexed`) is the replica's loader; Serve keeps an LRU of
the ids it loaded (`max_num_models_per_replica` = the engine's GPU adapter slots) and tells its routers
which replica holds which, so a request goes where its adapter already is. Residency stays one truth
(docs/scale-out.md, "Residency"): Serve dropping an id evicts it from the engine (`_Resident.__del__`),
and an id the engine's own LRU pushed out of its GPU slots is dropped from Serve's cache by `_reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from app.scaleout.adapter_store import ReplicaAdapterStore
from app.scaleout.calls import EngineCall, EngineInfo
from app.scaleout.replica_metrics import ReplicaMetrics
from app.scaleout.wire import Delta, Encode
from engine.config import EngineConfig
from engine.request import LoRARequest, RequestOutput
from engine.sampling_params import SamplingParamsError, StructuredSpec

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLMEngine

log = logging.getLogger(__name__)

APP_NAME = "loraplex-engine"
DEPLOYMENT_NAME = "EngineReplica"
# Serve's attribute for the multiplexing wrapper on the decorated function (ray/serve/api.py,
# `multiplexed`); read by _reconcile, pinned with the Ray version, checked by tests/ray/test_affinity.py.
SERVE_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"
STALL_SECONDS = 30.0


class _Resident:
    """What Serve's multiplex cache holds for one adapter; Serve calls __del__ when it unloads it."""

    def __init__(self, replica: EngineReplica, content_hash: str) -> None:
        self.replica = replica
        self.content_hash = content_hash
        self.gone = False

    def __del__(self) -> None:
        if not self.gone:
            self.gone = True
            self.replica.engine.evict_adapter(self.content_hash)


class EngineReplica:
    def __init__(self, config: EngineConfig, adapter_root: str) -> None:
        from engine.async_engine import AsyncLLMEngine

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.store = ReplicaAdapterStore(Path(adapter_root) / self.replica_id)
        # introspect() written here every tick: a node-local view of each replica (the handle cannot pick
        # a replica, so tests and operators read these files to see every one).
        self.state_file = Path(adapter_root) / "replicas" / f"{self.replica_id}.json"
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncLLMEngine = AsyncLLMEngine.from_config(config, adapter_loader=self.store.loader)
        self.engine.start()
        self.max_loras = config.max_loras
        self._incoming: dict[str, Any] = {}  # content hash -> ObjectRef of its files, for _adapter
        self._inflight: Counter[str] = Counter()  # content hash -> running requests on this replica
        self._running: set[str] = set()  # request ids
        self.metrics = ReplicaMetrics()

        async def load(content_hash: str) -> _Resident:
            return await self._load_adapter(content_hash)

        # Serve's LRU bound = the engine's GPU adapter slots. The wrapper Serve makes lives on `load`.
        self._multiplex_fn = load
        self._adapter = serve.multiplexed(max_num_models_per_replica=config.max_loras)(load)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="replica-tick")

    # ---- what the API tier calls --------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return EngineInfo(
            self.engine.model_name, self.engine.max_model_len, self.engine.vocab_size, self.max_loras
        )

    async def compile_grammar(self, spec: StructuredSpec) -> str | None:
        """The API tier's check of a structured-output spec: None, or why it does not compile."""
        try:
            await self.engine.compile_grammar(spec)
        except SamplingParamsError as exc:
            return str(exc).removeprefix(f"{exc.param} ")
        return None

    async def generate(self, call: EngineCall) -> AsyncIterator[list[Delta]]:
        """A streaming method: the request's outputs as deltas (app/scaleout/wire.py), each message holding
        every step that finished since the last one. A cancelled call (the client went away, or the API
        tier aborted it) cancels the pump, whose engine generator then aborts the request."""
        lora: LoRARequest | None = None
        content_hash: str | None = None
        if call.adapter is not None:
            content_hash = call.adapter.content_hash
            if serve.get_multiplexed_model_id() != content_hash:
                raise ValueError("model: the adapter and the multiplexed model id differ")
            self._incoming[content_hash] = call.adapter.files
            self._inflight[content_hash] += 1
            self.metrics.adapter_requests += 1
        self._running.add(call.request_id)
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        pump: asyncio.Task[None] | None = None
        try:
            if content_hash is not None:
                await self._adapter(content_hash)
                lora = LoRARequest(lora_name=content_hash[:12], content_hash=content_hash)
            outputs = self.engine.generate(
                call.request_id,
                call.prompt_token_ids,
                call.params,
                lora=lora,
                cache_salt=call.cache_salt,
                fairness_key=call.fairness_key,
            )
            pump = asyncio.get_running_loop().create_task(_pump(outputs, queue))
            done = False
            while not done:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                deltas: list[Delta] = []
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        done = True
                    else:
                        deltas.append(item)
                if deltas:
                    yield deltas
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
            self._running.discard(call.request_id)
            if content_hash is not None:
                self._inflight[content_hash] -= 1
                if self._inflight[content_hash] <= 0:
                    del self._inflight[content_hash]
                self._reconcile()

    def introspect(self) -> dict[str, Any]:
        """This replica as tests and operators see it: its adapters as Serve and the engine hold them,
        loads per adapter, adapter requests served, and the requests running now."""
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "serve": list(self._multiplexed().keys()),
            "engine_gpu": self.engine.engine.adapter_cache.gpu_order(),
            "loads": dict(self.metrics.loads_by_adapter),
            "adapter_requests": self.metrics.adapter_requests,
            "running": sorted(self._running),
        }

    def check_health(self) -> None:
        """Serve's periodic probe: a dead or stuck engine makes Serve replace this replica."""
        if not self.engine.is_healthy:
            raise RuntimeError(f"engine dead: {self.engine.dead_error}")
        stalled = time.monotonic() - self.engine.last_tick
        if stalled > STALL_SECONDS:
            raise RuntimeError(f"engine loop has not ticked for {stalled:.0f}s")

    async def __del__(self) -> None:
        self._ticker.cancel()
        await self.engine.shutdown()

    # ---- residency --------------------------------------------------------------------------------
    async def _load_adapter(self, content_hash: str) -> _Resident:
        """Serve's loader for one multiplexed id: the adapter's files onto this replica's disk; the engine
        then loads it into a GPU slot when its request is scheduled (the engine's own loader path)."""
        ref = self._incoming.pop(content_hash, None)
        if not self.store.has(content_hash):
            if ref is None:
                raise ValueError(f"adapter {content_hash[:12]}: no files sent")
            files = await ref
            await asyncio.to_thread(self.store.write, content_hash, files)
        self.metrics.loads_by_adapter[content_hash] += 1
        return _Resident(self, content_hash)

    def _multiplexed(self) -> Any:
        wrapper = getattr(self._multiplex_fn, SERVE_MULTIPLEX_ATTR, None)
        return wrapper.models if wrapper is not None else {}

    def _reconcile(self) -> None:
        """Drop from Serve's cache what the engine's LRU evicted from its GPU slots (idle ones only: an id
        whose request has not reached the engine yet is not resident there either)."""
        wrapper = getattr(self._multiplex_fn, SERVE_MULTIPLEX_ATTR, None)
        if wrapper is None:
            return
        on_gpu = set(self.engine.engine.adapter_cache.gpu_order())
        gone = [h for h in list(wrapper.models) if h not in on_gpu and self._inflight[h] <= 0]
        for content_hash in gone:
            resident = wrapper.models.pop(content_hash, None)
            if resident is not None:
                resident.gone = True  # already out of the engine's slots; the CPU tier may keep it
            self._inflight.pop(content_hash, None)
        if gone:
            wrapper._push_multiplexed_replica_info = True  # Serve pushes the new set to its routers

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                self._reconcile()
                self.metrics.observe(self.engine, len(self._multiplexed()))
                tmp = self.state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.introspect()))
                os.replace(tmp, self.state_file)


async def _pump(
    outputs: AsyncIterator[RequestOutput], queue: asyncio.Queue[Delta | BaseException | None]
) -> None:
    """Engine outputs -> deltas on the queue, then None (or the exception that ended them)."""
    encode = Encode()
    try:
        # Cancelled, the engine generator is cancelled inside it too, and its `finally` aborts the request.
        async for out in outputs:
            queue.put_nowait(encode(out))
    except Exception as exc:
        queue.put_nowait(exc)
        return
    queue.put_nowait(None)


def engine_application(
    config: EngineConfig,
    adapter_root: Path,
    replicas: int,
    gpus: float,
    cpus: float,
    max_ongoing_requests: int,
) -> Any:
    """The bound Serve application of `replicas` engine replicas (serve.run deploys it)."""
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cpus},
        health_check_period_s=2.0,
        health_check_timeout_s=10.0,
    )(EngineReplica)
    return deployment.bind(config, str(adapter_root))
