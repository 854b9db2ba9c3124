"""The app's handle on the inference engine: started in the lifespan, asked by /ready, fed adapters.

`EngineClient` is the seam the completion path types against; two implementations sit behind it, picked
once at start by `engine_client(settings)`: `LocalEngineClient` here (the engine in this process, what
`loraplex serve` runs) and app/scaleout/client.py's `RayEngineClient` (engine replicas on Ray Serve,
`loraplex serve --ray`).

Only the engine's torch-free public types (engine.request, engine.sampling_params) are imported up front;
the engine proper (and with it torch) only when the engine starts, so the API package stays importable
and quick to test without it. Loading runs in a worker thread: /health answers at once and
/ready turns 200 only when the model is loaded and the engine loop ticks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.request import LoRARequest, RequestOutput
from engine.sampling_params import SamplingParams, StructuredSpec

if TYPE_CHECKING:  # the engine proper needs torch: imported only when it starts (see _build)
    from engine.async_engine import AsyncLLMEngine
    from engine.engine import EngineStats

from engine.config import EngineConfig

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """The engine cannot take requests (still loading, failed to load, or died); the client gets 503."""


class AdapterSource(Protocol):
    """Where the engine's loader finds an adapter's files by content hash (see adapter_files.py)."""

    def local_folder(self, content_hash: str) -> str: ...


class EngineClient(Protocol):
    """What the app asks of an engine, wherever it runs. Errors: EngineUnavailable (a 503), ValueError
    from generate for a request the engine refuses (a 400), anything else from generate = the engine
    failed this request (a 503)."""

    config: EngineConfig | None

    def attach_adapters(self, adapters: AdapterSource) -> None: ...
    def start_loading(self) -> None: ...
    async def wait_loaded(self, timeout: float | None = None) -> None: ...
    async def shutdown(self) -> None: ...
    def readiness(self) -> tuple[bool, str]: ...
    def live_replicas(self) -> int | None: ...
    @property
    def model_name(self) -> str: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]: ...
    @property
    def chat_template(self) -> str | None: ...
    async def compile_grammar(self, spec: StructuredSpec) -> None: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def decode_token(self, token_id: int) -> str: ...
    def lora_request(self, name: str, folder: Path, content_hash: str) -> LoRARequest: ...
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None,
        cache_salt: str,
        fairness_key: str,
    ) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def evict_adapter(self, content_hash: str) -> None: ...
    def stats(self) -> EngineStats | None: ...


def engine_client(settings: Settings) -> EngineClient:
    """The in-process engine, or with `serve --ray` (settings.ray) the Ray Serve engine tier."""
    if settings.ray:
        from app.scaleout.client import RayEngineClient

        return RayEngineClient(settings)
    return LocalEngineClient(settings.engine_config())


class LocalEngineClient:
    """The engine in this process (`loraplex serve`)."""

    def __init__(
        self,
        config: EngineConfig | None,
        adapters: AdapterSource | None = None,
        stall_seconds: float = 30.0,
    ) -> None:
        # config None = no model configured: /v1 answers 503. Built by Settings.engine_config().
        self.config = config
        # The loop is "not ticking" when it has not come round for this long: a stuck step or a dead thread.
        self.stall_seconds = stall_seconds
        self._adapters = adapters
        self._engine: AsyncLLMEngine | None = None
        self._load_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def attach_adapters(self, adapters: AdapterSource) -> None:
        """Where the loader finds adapter files; set before the engine starts."""
        self._adapters = adapters

    # ---- lifecycle -------------------------------------------------------------------------------
    def start_loading(self) -> None:
        """Begin loading in a worker thread; returns at once (the app's startup hook calls this)."""
        self._task = asyncio.get_running_loop().create_task(self._load(), name="engine-load")

    async def wait_loaded(self, timeout: float | None = None) -> None:
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            self._engine = await asyncio.to_thread(self._build)
        except Exception as exc:
            self._load_error = f"{type(exc).__name__}: {exc}"
            log.exception("engine failed to load model %s", self.config and self.config.model)
            return
        log.info(
            "engine ready: model %s, max_model_len %s, %.1fs",
            self._engine.model_name,
            self._engine.max_model_len,
            time.monotonic() - started,
        )

    def _build(self) -> AsyncLLMEngine:
        from engine.async_engine import AsyncLLMEngine

        assert self.config is not None
        engine = AsyncLLMEngine.from_config(self.config, adapter_loader=self._load_adapter)
        engine.start()
        return engine

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            # A load in progress cannot be interrupted; let it finish so its thread does not outlive us.
            await asyncio.wait([self._task])
        if self._engine is not None:
            await self._engine.shutdown()
            self._engine = None

    # ---- the loader callback (runs on the engine's loader thread) -----------------------------------
    def _load_adapter(self, lora: LoRARequest) -> str:
        if self._adapters is None:
            if lora.lora_path is None:
                raise FileNotFoundError(f"no adapter source for {lora.lora_name}")
            return str(lora.lora_path)
        assert lora.content_hash is not None  # LoRARequest computes it when it is not given
        return self._adapters.local_folder(lora.content_hash)

    # ---- state ------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /ready: model loaded, loop alive and ticking."""
        if self.config is None:
            return False, "no model configured (set LORAPLEX_MODEL)"
        if self._load_error is not None:
            return False, f"model failed to load: {self._load_error}"
        engine = self._engine
        if engine is None:
            return False, "model loading"
        if not engine.is_healthy:
            return False, f"engine dead: {engine.dead_error}"
        stalled = time.monotonic() - engine.last_tick
        if stalled > self.stall_seconds:
            return False, f"engine loop has not ticked for {stalled:.0f}s"
        return True, "ok"

    @property
    def engine(self) -> AsyncLLMEngine:
        """The running engine, or EngineUnavailable (a 503) when it is not ready."""
        ready, reason = self.readiness()
        if not ready or self._engine is None:
            raise EngineUnavailable(reason)
        return self._engine

    def live_replicas(self) -> int | None:
        """Only the Ray tier has replicas; /ready shows none for the in-process engine."""
        return None

    # ---- what the completion path uses ------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return str(self.engine.model_name)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.engine.encode(text, add_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return list(self.engine.apply_chat_template(messages, tools))

    @property
    def chat_template(self) -> str | None:
        return self.engine.chat_template

    async def compile_grammar(self, spec: StructuredSpec) -> None:
        """Compile a structured-output spec off the event loop (cached by the engine); GrammarError
        (a ValueError naming `structured`) when it cannot compile in time."""
        await self.engine.compile_grammar(spec)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.engine.decode(token_ids))

    def decode_token(self, token_id: int) -> str:
        return str(self.engine.decode([token_id]))

    def lora_request(self, name: str, folder: Path, content_hash: str) -> LoRARequest:
        return LoRARequest(lora_name=name, lora_path=str(folder), content_hash=content_hash)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None,
        cache_salt: str,
        fairness_key: str,
    ) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(
            request_id,
            prompt_token_ids,
            params,
            lora=lora,
            cache_salt=cache_salt,
            fairness_key=fairness_key,
        )

    def abort(self, request_id: str) -> None:
        if self._engine is not None:
            self._engine.abort(request_id)

    def evict_adapter(self, content_hash: str) -> None:
        if self._engine is not None:
            self._engine.evict_adapter(content_hash)

    def stats(self) -> EngineStats | None:
        return self._engine.stats() if self._engine is not None else None
