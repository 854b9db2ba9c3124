"""`RayEngineClient`: the app's EngineClient seam (app/engine_client.py) over the Ray Serve engine tier.

Each request is one streaming handle call, `multiplexed_model_id` = the adapter's content hash, so Serve
routes it to a replica holding that adapter (base-model requests carry none and go anywhere). Tokenizing
stays here (engine/tokenizer.py). A replica lost before any output reached us is retried on another
(`retries` times); lost after, the request fails with EngineUnavailable (a 503 in the error envelope, and
usage settled by the completion path for what was delivered). Limits and usage stay in this tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.engine_client import AdapterSource, EngineUnavailable
from app.scaleout.adapter_store import read_adapter_files
from app.scaleout.calls import AdapterFilesRef, EngineCall, EngineInfo
from app.scaleout.wire import Rebuild
from engine.config import EngineConfig
from engine.request import LoRARequest, RequestOutput
from engine.sampling_params import SamplingParams, SamplingParamsError, StructuredSpec
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.engine import EngineStats

log = logging.getLogger(__name__)

FILE_REFS_KEPT = 64  # adapters whose files this API instance keeps in Ray's object store
REPLICAS_POLL_SECONDS = 1.0


class RayEngineClient:
    def __init__(self, settings: Settings, retries: int = 1) -> None:
        self.config: EngineConfig | None = settings.engine_config()
        self.settings = settings
        self.retries = retries
        self._handle: Any = None
        self._info: EngineInfo | None = None
        self._tokenizer: Tokenizer | None = None
        self._load_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._live = 0
        self._calls: dict[str, Any] = {}  # request id -> its DeploymentResponseGenerator
        self._file_refs: OrderedDict[str, Any] = OrderedDict()
        self.retried = 0  # requests sent again after their replica was lost before any output

    # ---- lifecycle --------------------------------------------------------------------------------
    def attach_adapters(self, adapters: AdapterSource) -> None:
        """Unused: the completion path hands us each adapter's verified local folder (lora_request)."""

    def start_loading(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load(), name="engine-tier-connect")

    async def wait_loaded(self, timeout: float | None = None) -> None:
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def _load(self) -> None:
        from ray import serve

        from app.scaleout.cluster import deploy_engine
        from app.scaleout.replica import APP_NAME, DEPLOYMENT_NAME

        assert self.config is not None
        try:
            await asyncio.to_thread(deploy_engine, self.settings)
            self._tokenizer = await asyncio.to_thread(Tokenizer.load, self.config.model)
            handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
            self._info = await handle.info.remote()
            await self._poll_replicas()
        except Exception as exc:
            self._load_error = f"{type(exc).__name__}: {exc}"
            log.exception("engine tier unavailable")
            return
        self._handle = handle
        self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name="engine-replicas")
        log.info("engine tier ready: %d replica(s) of %s", self._live, self._info.model_name)

    async def _poll_replicas(self) -> None:
        from app.scaleout.cluster import live_replicas

        self._live = await asyncio.to_thread(live_replicas)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(REPLICAS_POLL_SECONDS)
            try:
                await self._poll_replicas()
            except Exception:
                log.warning("cannot read the engine tier's status", exc_info=True)
                self._live = 0

    async def shutdown(self) -> None:
        """The API instance goes; the engine tier stays for the others (`ray stop` / the RayService ends it)."""
        for task in (self._task, self._poller):
            if task is not None and not task.done():
                task.cancel()
        for call in list(self._calls.values()):
            call.cancel()

    # ---- state ------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if self.config is None:
            return False, "no model configured (set LORAPLEX_MODEL)"
        if self._load_error is not None:
            return False, f"engine tier unavailable: {self._load_error}"
        if self._handle is None or self._info is None:
            return False, "engine tier starting"
        if self._live <= 0:
            return False, "no live engine replicas: all replicas are down or restarting"
        return True, "ok"

    def live_replicas(self) -> int | None:
        return self._live

    def _ready(self) -> tuple[Any, EngineInfo, Tokenizer]:
        ready, reason = self.readiness()
        if not ready or self._info is None or self._tokenizer is None:
            raise EngineUnavailable(reason)
        return self._handle, self._info, self._tokenizer

    @property
    def model_name(self) -> str:
        return self._ready()[1].model_name

    @property
    def max_model_len(self) -> int:
        return self._ready()[1].max_model_len

    @property
    def vocab_size(self) -> int:
        return self._ready()[1].vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._ready()[2].encode(text, add_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self._ready()[2].apply_chat_template(messages, tools)

    @property
    def chat_template(self) -> str | None:
        return self._ready()[2].chat_template

    async def compile_grammar(self, spec: StructuredSpec) -> None:
        """Compiled on a replica (the grammar library and the engine's tokenizer live there; the replica
        that serves the request compiles it again from its cache or anew); a spec that cannot compile is
        the same SamplingParamsError as in-process."""
        handle = self._ready()[0]
        error = await handle.compile_grammar.remote(spec)
        if error is not None:
            raise SamplingParamsError("structured", error)

    def decode(self, token_ids: list[int]) -> str:
        return self._ready()[2].decode(token_ids)

    def decode_token(self, token_id: int) -> str:
        return self._ready()[2].decode([token_id])

    def lora_request(self, name: str, folder: Path, content_hash: str) -> LoRARequest:
        return LoRARequest(lora_name=name, lora_path=str(folder), content_hash=content_hash)

    def stats(self) -> EngineStats | None:
        """Engine stats live on the replicas and reach Prometheus through Ray (docs/scale-out.md)."""
        return None

    # ---- requests ---------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None,
        cache_salt: str,
        fairness_key: str,
    ) -> AsyncIterator[RequestOutput]:
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import RequestCancelledError

        handle = self._ready()[0]
        adapter = await self._adapter_ref(lora) if lora is not None else None
        call = EngineCall(request_id, prompt_token_ids, params, adapter, cache_salt, fairness_key)
        model_id = adapter.content_hash if adapter is not None else ""
        method = handle.options(stream=True, multiplexed_model_id=model_id).generate
        attempt = 0
        while True:
            stream = method.remote(call)
            self._calls[request_id] = stream
            rebuild = Rebuild(request_id, prompt_token_ids)
            received = finished = False
            try:
                async for deltas in stream:
                    received = True
                    for delta in deltas:
                        out = rebuild(delta)
                        finished = out.finished
                        yield out
                return
            except RayTaskError as exc:
                # Raised inside the replica: a refused request stays a ValueError (400), without Ray's
                # traceback in its message; anything else is the engine failing this request (503).
                cause = exc.cause
                if isinstance(cause, ValueError):
                    raise ValueError(str(cause)) from None
                raise RuntimeError(f"{type(cause).__name__}: {cause}") from None
            except RequestCancelledError:
                return  # aborted by us (abort()); the completion path settles what it has
            except RayError as exc:
                # The replica died or became unreachable under this request.
                if received or attempt >= self.retries:
                    raise EngineUnavailable(f"engine replica lost: {type(exc).__name__}") from exc
                attempt += 1
                self.retried += 1
                log.warning("replica lost before %s's first output; retrying (%s)", request_id, exc)
            finally:
                if self._calls.get(request_id) is stream:
                    del self._calls[request_id]
                if not finished:
                    stream.cancel()  # a no-op once the call has ended; else the replica aborts it

    def abort(self, request_id: str) -> None:
        stream = self._calls.pop(request_id, None)
        if stream is not None:
            stream.cancel()

    def evict_adapter(self, content_hash: str) -> None:
        """A deleted adapter: no request can name it any more (the registry refuses it), so replicas lose
        it by their LRU; here only its files leave the object store."""
        self._file_refs.pop(content_hash, None)

    async def _adapter_ref(self, lora: LoRARequest) -> AdapterFilesRef:
        import ray

        assert lora.content_hash is not None and lora.lora_path is not None
        ref = self._file_refs.get(lora.content_hash)
        if ref is None:
            files = await asyncio.to_thread(read_adapter_files, Path(lora.lora_path))
            ref = await asyncio.to_thread(ray.put, files)
            self._file_refs[lora.content_hash] = ref
            while len(self._file_refs) > FILE_REFS_KEPT:
                self._file_refs.popitem(last=False)
        self._file_refs.move_to_end(lora.content_hash)
        return AdapterFilesRef(lora.content_hash, ref)
