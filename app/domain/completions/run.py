"""One engine request from admission to settlement: limiter, usage reservation, engine stream, settle once.

`begin()` is the last point where a request can be refused cleanly (429 from the limiter, 503 when the
usage row cannot be written). Once it returns, `finish()` must run exactly once whatever happens
(finished, client gone, engine dead); it is idempotent and shielded from cancellation, so the streaming
path can call it from a `finally` while its task is being cancelled by a disconnect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from app.domain.completions.params import RequestError, SamplingSpec
from app.engine_client import EngineClient, EngineUnavailable
from engine.request import CompletionOutput, Logprob, LoRARequest, RequestOutput

log = logging.getLogger(__name__)


class Meter(Protocol):
    """app/domain/usage's `Metering`: a reserved row before the engine, settled exactly once."""

    async def reserve(
        self,
        request_id: str,
        tenant_id: str,
        key_id: str | None,
        adapter_id: str | None,
        adapter_version: int | None,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
    ) -> None: ...

    async def settle(
        self,
        request_id: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        finish_reason: str | None,
        status: str,
        queue_time_s: float | None = None,
        ttft_s: float | None = None,
        latency_s: float | None = None,
    ) -> bool: ...


class RequestMetrics(Protocol):
    """The hooks of app/metrics' `Metrics` that the completion path feeds."""

    def first_token(self, ttft_s: float) -> None: ...
    def output_tokens(self, gap_s: float, num_tokens: int = 1) -> None: ...
    def request_finished(
        self,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float | None,
        queue_s: float | None = None,
    ) -> None: ...
    def request_rate_limited(self, reason: str | None) -> None: ...


class Limits(Protocol):
    async def admit(self, tenant: Any, reserve_tokens: int) -> Any: ...
    async def settle(self, admission: Any, used_tokens: int) -> None: ...


@dataclass(slots=True)
class Caller:
    tenant: Any  # the tenant row: id and limits
    tenant_id: str
    key_id: str | None


@dataclass(slots=True)
class Target:
    model: str  # the name the client sent, echoed back in responses
    adapter: Any | None = None  # the registry row, None for the base model
    lora: LoRARequest | None = None


@dataclass(slots=True)
class CompletionRun:
    request_id: str
    caller: Caller
    target: Target
    prompt_ids: list[int]
    spec: SamplingSpec  # its params.max_tokens is the number of tokens to generate (fitted)
    cache_salt: str
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    admission: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    last: RequestOutput | None = None  # the newest engine output
    # The newest CompletionOutput of each choice: an engine output carries only the choices that changed.
    choices: dict[int, CompletionOutput] = field(default_factory=dict)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    error: str | None = None
    settled: bool = False
    # A stream's tokens whose frames the server has sent (None: not a stream): counted when the server
    # asks for the next frame. A stream cut off by its client is billed these, never tokens the engine
    # made that no frame carried (the frame being sent at the cut, if any, is not billed).
    streamed_tokens: int | None = None
    # A list of prompts: the ones after prompt_ids. Each is its own engine request ("{id}-{p}") with n
    # choices, indexed p * n + i as OpenAI does; one usage row (this request_id) bills them all.
    extra_prompts: list[list[int]] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)  # echo: each prompt's text
    # The newest engine output of each prompt, and each prompt's logprobs once the engine sent them.
    lasts: dict[int, RequestOutput] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[dict[int, Logprob] | None]] = field(default_factory=dict)

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prompt_ids, *self.extra_prompts]

    def engine_id(self, p: int) -> str:
        return self.request_id if p == 0 else f"{self.request_id}-{p}"

    # ---- what metering and responses read ----------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.spec.params.max_tokens or 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(p) for p in self.extra_prompts)

    @property
    def completion_tokens(self) -> int:
        if self.spec.prompt_only:
            return 0  # the engine's one token is never shown, so never billed
        if self.streamed_tokens is not None:
            return self.streamed_tokens
        return sum(len(o.token_ids) for o in self.choices.values())

    @property
    def cached_tokens(self) -> int:
        if not self.extra_prompts:
            return max(self.last.num_cached_tokens, 0) if self.last is not None else 0
        return sum(max(o.num_cached_tokens, 0) for o in self.lasts.values())

    @property
    def finished(self) -> bool:
        if not self.extra_prompts:
            return self.last is not None and self.last.finished
        return len(self.lasts) == len(self.prompts) and all(o.finished for o in self.lasts.values())

    @property
    def finish_reason(self) -> str | None:
        reasons = [o.finish_reason for _, o in sorted(self.choices.items()) if o.finish_reason]
        return reasons[0] if reasons else None

    @property
    def num_choices(self) -> int:
        return self.spec.n * len(self.prompts)

    @property
    def reserve_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens * self.num_choices

    def timings(self) -> dict[str, float | None]:
        m = self.last.metrics if self.last is not None else None
        now = time.monotonic()
        queue = None
        if m is not None and m.first_scheduled_time is not None:
            queue = max(m.first_scheduled_time - m.arrival_time, 0.0)
        ttft = self.first_token_at - self.started if self.first_token_at is not None else None
        return {"queue_time_s": queue, "ttft_s": ttft, "latency_s": now - self.started}


class RunDriver:
    """Runs CompletionRuns against the engine with the app's limiter, meter and metrics.

    They are read from the app's state on use (keys below), because other lifespans create them and the
    order in which lifespans start should not matter.
    """

    def __init__(self, engine: EngineClient, state: Mapping[str, Any], capacity: int | None = None) -> None:
        """`capacity`: runs this process takes at once (running + queued in the engine); past it a new
        one is refused at once with 503 `server_overloaded` (None: no bound)."""
        self.engine = engine
        self._state = state
        self._settling: set[asyncio.Future[None]] = set()  # referenced until done, so none is collected
        self.capacity = capacity
        # Engine request ids between begin() and their settlement (a list of prompts holds one per prompt).
        self.active: set[str] = set()

    @property
    def limiter(self) -> Limits | None:
        return self._state.get("limiter")

    @property
    def meter(self) -> Meter | None:
        return self._state.get("metering")

    @property
    def metrics(self) -> RequestMetrics | None:
        return self._state.get("metrics")

    async def begin(self, run: CompletionRun) -> None:
        if self.capacity is not None and len(self.active) >= self.capacity:
            # Full: say so now, before any limit or row is touched, rather than queue without bound.
            raise RequestError(
                503,
                "The server is at capacity; retry shortly",
                code="server_overloaded",
                type_="server_error",
                headers={"Retry-After": "1"},
            )
        engine_ids = {run.engine_id(p) for p in range(len(run.prompts))}
        self.active.update(engine_ids)
        try:
            await self._admit(run)
        except BaseException:
            self.active.difference_update(engine_ids)
            raise

    async def _admit(self, run: CompletionRun) -> None:
        limiter, meter = self.limiter, self.meter
        if limiter is not None:
            admission = await limiter.admit(run.caller.tenant, run.reserve_tokens)
            run.headers.update(admission.headers)
            if not admission.allowed:
                if self.metrics is not None:
                    self.metrics.request_rate_limited(admission.reason)
                raise RequestError(
                    429,
                    admission.message,
                    code="rate_limit_exceeded",
                    type_="rate_limit_error",
                    headers={**admission.headers, **admission.retry_after_header},
                )
            run.admission = admission
        if meter is not None:
            adapter = run.target.adapter
            try:
                await meter.reserve(
                    run.request_id,
                    run.caller.tenant_id,
                    run.caller.key_id,
                    str(adapter.id) if adapter is not None else None,
                    int(adapter.version) if adapter is not None else None,
                    run.target.model,
                    run.prompt_tokens,
                    run.max_tokens * run.num_choices,
                )
            except BaseException:
                await self._release(run)
                raise

    async def outputs(self, run: CompletionRun) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for this run (the choices of prompt p re-indexed p * n + i);
        EngineUnavailable when the engine is or goes down."""
        try:
            async for p, out in self._merged(run):
                if p:
                    shift = p * run.spec.n
                    out = dataclasses.replace(
                        out, outputs=[dataclasses.replace(o, index=o.index + shift) for o in out.outputs]
                    )
                if out.prompt_logprobs is not None:
                    run.prompt_logprobs[p] = out.prompt_logprobs
                self._observe(run, out)
                run.last = run.lasts[p] = out
                run.choices.update({o.index: o for o in out.outputs})
                yield out
        except EngineUnavailable as exc:
            run.error = str(exc)
            raise
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            raise
        except ValueError as exc:
            # The engine refused the request before running it; its messages start with the parameter.
            run.error = str(exc)
            raise RequestError(400, str(exc), param=str(exc).split(" ", 1)[0], code="invalid_value") from exc
        except Exception as exc:
            # The engine's loop died under this request (or refused it); either way the client gets 503.
            run.error = f"{type(exc).__name__}: {exc}"
            log.warning("engine failed request %s: %s", run.request_id, run.error)
            raise EngineUnavailable(run.error) from exc

    def _generate(self, run: CompletionRun, p: int) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(
            run.engine_id(p),
            run.prompts[p],
            run.spec.params,
            run.target.lora,
            run.cache_salt,
            run.caller.tenant_id,
        )

    async def _merged(self, run: CompletionRun) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) of every prompt's engine request, in the order they come."""
        if not run.extra_prompts:
            async for out in self._generate(run, 0):
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue()

        async def pump(p: int) -> None:
            try:
                async for out in self._generate(run, p):
                    queue.put_nowait((p, out, None))
                queue.put_nowait((p, None, None))
            except Exception as exc:
                queue.put_nowait((p, None, exc))

        tasks = [asyncio.ensure_future(pump(p)) for p in range(len(run.prompts))]
        try:
            running = len(tasks)
            while running:
                p, item, exc = await queue.get()
                if exc is not None:
                    raise exc
                if item is None:
                    running -= 1
                else:
                    yield p, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, run: CompletionRun, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(
            len(o.token_ids) - len(getattr(run.choices.get(o.index), "token_ids", ())) for o in out.outputs
        )
        if new_tokens <= 0:
            return
        if run.first_token_at is None:
            run.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - run.started)
                if new_tokens > 1:
                    self.metrics.output_tokens(0.0, new_tokens - 1)
        elif self.metrics is not None:
            self.metrics.output_tokens(now - run.last_token_at, new_tokens)
        run.last_token_at = now

    async def finish(self, run: CompletionRun) -> None:
        """Settle exactly once: abort the engine request if still running, write usage, free limits.

        The writes run in their own task, so a caller cancelled meanwhile (a disconnect, by anyio's cancel
        scope or by a plain task.cancel()) cannot cut them short: it stops waiting, the settle goes on.
        """
        if run.settled:
            return
        run.settled = True
        if not run.finished:
            for p in range(len(run.prompts)):
                self.engine.abort(run.engine_id(p))
        task = asyncio.ensure_future(self._settle(run))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        with anyio.CancelScope(shield=True):
            await asyncio.shield(task)

    async def _settle(self, run: CompletionRun) -> None:
        status = "ok" if run.finished and run.error is None else ("error" if run.error else "aborted")
        t = run.timings()
        metrics, meter = self.metrics, self.meter
        if metrics is not None:
            reason = run.finish_reason if status == "ok" else ("error" if run.error else "abort")
            metrics.request_finished(
                reason, run.prompt_tokens, run.completion_tokens, t["latency_s"], t["queue_time_s"]
            )
        if meter is not None:
            try:
                await meter.settle(
                    run.request_id,
                    run.prompt_tokens,
                    run.cached_tokens,
                    run.completion_tokens,
                    run.finish_reason,
                    status,
                    queue_time_s=t["queue_time_s"],
                    ttft_s=t["ttft_s"],
                    latency_s=t["latency_s"],
                )
            except Exception:
                # Metering keeps and retries settlements the database refused; anything else is a bug
                # to log, never a reason to fail a response that was already produced.
                log.exception("usage settle failed for %s", run.request_id)
        try:
            await self._release(run)
        finally:
            self.active.difference_update(run.engine_id(p) for p in range(len(run.prompts)))

    async def _release(self, run: CompletionRun) -> None:
        limiter = self.limiter
        if limiter is not None and run.admission is not None:
            admission, run.admission = run.admission, None
            used = run.prompt_tokens + run.completion_tokens if run.last is not None else 0
            await limiter.settle(admission, used)
