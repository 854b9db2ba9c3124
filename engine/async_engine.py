"""AsyncLLMEngine: the one protocol the app uses. The engine loop runs in its own thread; asyncio callers
talk to it through a command inbox, and get outputs back through per-request asyncio queues.

A step that raises because of one request's data fails that request alone (RequestFailedError) and the
loop goes on; engine/step_guard.py finds the request and restores the engine's state. A fault of the
engine itself (an accelerator error, a broken invariant, steps failing over and over) fails every
in-flight request with EngineDeadError, marks the engine dead (is_healthy False, dead_error set) and
refuses new work: a half-updated engine is never trusted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.engine import EngineStats, LLMEngine
from engine.request import LoRARequest, RequestOutput
from engine.sampling_params import SamplingParams, StructuredSpec
from engine.step_guard import StepGuard
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; this request and every later one cannot be served."""


class RequestFailedError(RuntimeError):
    """This request could not run (e.g. its adapter failed to load); the engine itself is fine."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.text = Tokenizer(engine.tokenizer)
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        self.is_healthy = True
        self.dead_error: str | None = None
        self.last_tick = time.monotonic()
        self._inbox: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False  # set under _lock once the loop no longer drains the inbox
        self._streams: dict[str, _Stream] = {}  # touched only by the loop thread once registered
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None
        self.guard = StepGuard(engine)

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_loader: Any = None) -> AsyncLLMEngine:
        return cls(LLMEngine.from_config(config, adapter_loader))

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.engine.close()

    # ---- tokenizer-facing (engine/tokenizer.py) ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.text.encode(text, add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.text.decode(token_ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.text.apply_chat_template(messages, tools)

    @property
    def chat_template(self) -> str | None:
        return self.text.chat_template

    # ---- requests ----
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None = None,
        cache_salt: str | None = None,
        fairness_key: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (deltas in each CompletionOutput), the last with finished=True.
        Bad input raises ValueError before anything runs; leaving the loop early aborts the request."""
        self._check_alive()
        if isinstance(params, SamplingParams) and params.structured is not None:
            await self.compile_grammar(params.structured)  # off the loop; add_request then hits the cache
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: asyncio.Future[None] = stream.loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(
                    request_id,
                    prompt_token_ids,
                    params,
                    lora=lora,
                    cache_salt=cache_salt,
                    fairness_key=fairness_key,
                )
            except Exception as exc:
                stream.loop.call_soon_threadsafe(_settle, added, exc)
                return
            self._streams[request_id] = stream
            stream.loop.call_soon_threadsafe(_settle, added, None)

        self._submit(add)
        try:
            await added
        except asyncio.CancelledError:
            # The add may still go through after we stop waiting: queue its abort right behind it.
            self._abort_own(request_id, stream)
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise RequestFailedError(item.error)  # `finally` aborts any sibling samples still running
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_own(request_id, stream)

    async def compile_grammar(self, spec: StructuredSpec) -> None:
        """Compile a structured-output spec on the compiler's threads (cached); GrammarError (a ValueError)
        when it cannot compile or takes longer than the compiler's time limit."""
        await asyncio.to_thread(self.engine.grammars.compile, spec)

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. the client went away); its stream ends with finish_reason "abort"."""

        def run() -> None:
            self.guard.unhold(request_id)
            output = self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None and output is not None:
                _deliver(stream, output)

        with contextlib.suppress(EngineDeadError):  # a dead engine has nothing left to abort
            self._submit(run)

    def _abort_own(self, request_id: str, stream: _Stream) -> None:
        """Abort only if the engine's request under this id is still the one this stream belongs to (the
        id may have been refused as a duplicate, or already reused by a newer request)."""

        def run() -> None:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
                self.guard.unhold(request_id)
                output = self.engine.abort(request_id)
                if output is not None:
                    _deliver(stream, output)

        with contextlib.suppress(EngineDeadError):
            self._submit(run)

    def evict_adapter(self, content_hash: str) -> None:
        with contextlib.suppress(EngineDeadError):
            self._submit(lambda: self.engine.evict_adapter(content_hash))

    def stats(self) -> EngineStats:
        """A snapshot taken by the loop after its latest step."""
        return self._stats

    # ---- the loop thread ----
    def _submit(self, command: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise EngineDeadError(f"engine is not running: {self.dead_error or 'shut down'}")
            self._inbox.append(command)
        self._wake.set()

    def _check_alive(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"engine is dead: {self.dead_error}")
        if self._thread is None:
            raise EngineDeadError("engine is not started")

    def _run(self) -> None:
        try:
            while not self._stop:
                self.last_tick = time.monotonic()
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    # Tensor parallel: a worker lost while idle -> EngineFault -> dead.
                    self.engine.runner.check_workers()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                self.guard.before_step()
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    outputs = self.guard.recover(exc)  # EngineFault when no request is to blame
                else:
                    self.guard.succeeded()
                # Snapshot first: a caller that just saw its request finish must not see it running.
                self._stats = self.engine.stats()
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    if output.finished:
                        del self._streams[output.request_id]
                    _deliver(stream, output)
        except BaseException as exc:
            self._die(exc)
            return
        self._close_inbox()
        self._fail_all(EngineDeadError("engine shut down"))

    def _drain_inbox(self) -> None:
        with self._lock:
            commands, self._inbox = self._inbox, []
        for command in commands:
            command()

    def _die(self, exc: BaseException) -> None:
        log.exception("engine loop failed; failing every in-flight request", exc_info=exc)
        self.dead_error = f"{type(exc).__name__}: {exc}"
        self.is_healthy = False
        self._close_inbox()
        self._fail_all(EngineDeadError(f"engine loop failed: {self.dead_error}"))

    def _close_inbox(self) -> None:
        """Stop taking commands, and answer the ones that raced in: their generate() calls are waiting."""
        with self._lock:
            self._closed = True
            late, self._inbox = self._inbox, []
        for command in late:
            try:
                command()
            except Exception:
                log.debug("command after the loop stopped failed", exc_info=True)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            _deliver(stream, error)


def _deliver(stream: _Stream, item: RequestOutput | BaseException) -> None:
    # RuntimeError: the caller's event loop is closed, so nobody is listening any more.
    with contextlib.suppress(RuntimeError):
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
