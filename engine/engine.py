"""LLMEngine: requests in, one step = schedule -> run -> postprocess, outputs out. Single-threaded.

With n > 1 a request becomes n sequences ("{id}#{i}") that share the prompt's blocks through the prefix
cache; outputs are grouped back under the caller's id.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from engine.async_scheduling import AsyncScheduling
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import Group, build_output
from engine.prompt_logprobs import collect_prompt_logprobs, wants_prompt_logprobs
from engine.request import LoRARequest, Request, RequestOutput, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.spec.decoder import Run, SpecDecoder
from engine.structured import GrammarCompiler


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float  # share of KV blocks held by requests (cached blocks nobody holds count as free)
    num_kv_blocks: int
    prefix_hit_rate: float  # cached / looked-up prompt tokens since start
    prefix_queried_tokens: int = 0  # counters since start, for Prometheus
    prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    adapter_cache: dict[str, float] = field(default_factory=dict)
    running_adapters: list[str] = field(default_factory=list)  # adapter display names, one per request
    waiting_adapters: list[str] = field(default_factory=list)
    # Speculative decoding counters (engine/spec/stats.py's SpecStats.as_dict); empty when it is off.
    spec_decode: dict[str, Any] = field(default_factory=dict)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, model: Any, runner: Any, adapter_cache: Any, proposer: Any = None
    ) -> None:
        """model: a LoadedModel (engine/model_loader.py) — name, tokenizer, eos_token_ids, config;
        runner: ModelRunner (execute, num_kv_blocks, device); adapter_cache: AdapterCache; proposer: the
        speculative drafts' source (engine/spec/proposer.py), None: n-gram when speculation is on."""
        self.config = config
        self.model = model
        self.runner = runner
        self.adapter_cache = adapter_cache
        self.tokenizer = model.tokenizer
        self.model_name: str = model.name
        self.vocab_size: int = model.config.vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(model.eos_token_ids)
        capacity = runner.num_kv_blocks * config.block_size
        limits = [model.config.max_position_embeddings, capacity]
        if config.max_model_len is not None:
            limits.append(config.max_model_len)
        self.max_model_len: int = min(limits)
        self.block_manager = BlockManager(
            runner.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, adapter_cache, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.groups: dict[str, Group] = {}
        # Structured outputs' compiler and cache (engine/structured.py); threads start on first use.
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.ahead = AsyncScheduling(
            config.async_scheduling,
            self.scheduler,
            runner,
            Sampler(runner.device, config.seed),
            self.max_model_len,
        )
        # Speculative decoding (engine/spec/), None when off. A proposer other than the configured one
        # (a benchmark's oracle) may be set on it after start.
        self.spec: SpecDecoder | None = None
        spec_config = config.speculative
        if spec_config is not None:
            self.spec = SpecDecoder(spec_config, self.max_model_len, proposer)
            self.spec.pad = getattr(runner, "graphs", None) is not None
            self.ahead.spec = self.spec

    @property
    def sampler(self) -> Sampler:
        """One sampler for synchronous and in-flight steps (async scheduling holds it)."""
        return self.ahead.sampler

    @sampler.setter
    def sampler(self, sampler: Sampler) -> None:
        self.ahead.sampler = sampler

    @property
    def async_scheduling(self) -> bool:
        return self.ahead.enabled

    @async_scheduling.setter
    def async_scheduling(self, enabled: bool) -> None:
        self.ahead.enabled = enabled  # a step already in flight still finishes the async way

    @property
    def num_steps_ahead(self) -> int:
        return self.ahead.num_steps_ahead

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_loader: Any = None) -> LLMEngine:
        from engine.adapter_cache import AdapterCache
        from engine.model_loader import load_model
        from engine.model_runner import ModelRunner

        if config.tensor_parallel_size > 1:
            from engine.parallel.driver import build

            return cls(config, *build(config, adapter_loader))
        loaded = load_model(config)
        cache = AdapterCache.for_model(config, loaded, adapter_loader)
        spec = config.speculative
        if spec is None or spec.method != "draft_model":
            return cls(config, loaded, ModelRunner(config, loaded, cache), cache)
        from engine.spec.draft_model import DraftModelProposer, load_draft

        draft, blocks = load_draft(config, spec, loaded)  # weights first: the KV budget is split after
        runner = ModelRunner(dataclasses.replace(config, num_kv_blocks=blocks), loaded, cache)
        proposer = DraftModelProposer.build(config, spec, draft, runner.num_kv_blocks)
        return cls(config, loaded, runner, cache, proposer)

    # ---- requests in ----
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoRARequest | None = None,
        cache_salt: str | None = None,
        fairness_key: str | None = None,
        prompt: str | None = None,
    ) -> None:
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        prompt_token_ids = self._check_prompt(prompt_token_ids)
        self._check_request(params, lora, cache_salt, fairness_key)
        params = self._fit_params(params, len(prompt_token_ids))
        children = []
        for i in range(params.n):
            child_params = params
            if params.seed is not None and i > 0:
                child_params = dataclasses.replace(params, seed=params.seed + i)
            children.append(
                Request(
                    request_id if params.n == 1 else f"{request_id}#{i}",
                    prompt_token_ids,
                    child_params,
                    eos_token_ids=self.eos_token_ids,
                    lora=lora,
                    cache_salt=cache_salt,
                    fairness_key=fairness_key or "",
                    parent_id=request_id,
                    index=i,
                )
            )
        if params.structured is not None:
            # Compiled already when the caller awaited grammars.compile (AsyncLLMEngine does): a cache hit.
            for child in children:
                child.grammar = self.grammars.matcher(params.structured)
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, c.params) for c in children]
        added: list[Request] = []
        try:
            for child in children:
                self.scheduler.add(child)
                added.append(child)
        except Exception:
            for child in added:  # all or nothing: an orphan sequence would have no group to report to
                self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
            raise
        self.groups[request_id] = Group(request_id, prompt, prompt_token_ids, children, detoks)
        if lora is not None and self.adapter_cache is not None:
            # Its load overlaps the wait for admission instead of starting when the scheduler asks.
            self.adapter_cache.prefetch(lora)

    def _check_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt must have at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            # An out-of-range id would index past the embedding table and kill the step for everyone.
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens; this engine's context is {self.max_model_len} "
                "and at least one must be left to generate"
            )
        return ids

    def _check_request(
        self,
        params: SamplingParams,
        lora: LoRARequest | None,
        cache_salt: str | None,
        fairness_key: str | None,
    ) -> None:
        """The door's checks besides the prompt: a value that got past them would raise inside a step,
        where it would fail every request of the batch (see engine/step_guard.py), not just its own."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()  # again: the object may have been changed since it was made
        params.check_vocab(self.vocab_size)
        if lora is not None and not isinstance(lora, LoRARequest):
            raise ValueError(f"lora must be a LoRARequest, got {type(lora).__name__}")
        if lora is not None and lora.content_hash is None:
            raise ValueError(f"adapter {lora.lora_name!r} has no content hash")
        for name, value in (("cache_salt", cache_salt), ("fairness_key", fairness_key)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {type(value).__name__}")

    def _fit_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if max_tokens == params.max_tokens:
            return params
        return dataclasses.replace(
            params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens)
        )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; returns its final output (finish_reason "abort"), or None."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for child in group.children:
            if not child.is_finished:
                self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
        return build_output(group, group.children)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # ---- the step ----
    def step(self) -> list[RequestOutput]:
        """schedule -> run -> sample -> postprocess. With async scheduling a step may be left in flight
        (its tokens still on the device); the next step() launches the step after it before reading them
        (engine/async_scheduling.py)."""
        if self.ahead.in_flight is not None:
            return self._advance_in_flight([])
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        scheduled = batch.scheduled
        if self.spec is not None and self.spec.has_drafts(scheduled):
            if not wants_prompt_logprobs(scheduled):
                return self._spec_step(batch)
            batch.scheduled = scheduled = self.spec.drop_drafts(scheduled)  # that path samples last rows
        logits = self._forward(scheduled) if scheduled else None
        self.scheduler.advance(batch)
        ready = [r for r, _ in scheduled if r.num_computed_tokens == len(r.all_token_ids)]
        if ready and self.ahead.start(ready, len(scheduled), logits):
            return self._advance_in_flight(batch.failed)
        if ready:
            self._postprocess(ready, self.sampler(self._rows_of(logits, scheduled, ready), ready))
        elif not scheduled and not batch.failed:
            self._wait_idle()
        return self._collect([*ready, *batch.failed])

    def _spec_step(self, batch: Any) -> list[RequestOutput]:
        """A step in which some sequences verify drafts (engine/spec/decoder.py): each emits 1 to k + 1
        tokens; never goes in flight (the next proposal needs them on the host)."""
        assert self.spec is not None
        logits, owners = self.spec.forward(self.runner, batch.scheduled)
        self.scheduler.advance(batch)
        runs = self.spec.verify(self.sampler, logits, owners)
        ready = [r for r, _, _ in owners]
        self._postprocess_runs(ready, runs)
        return self._collect([*ready, *batch.failed])

    def _forward(self, scheduled: list[tuple[Request, int]]) -> Any:
        """The step's logits [B, V], one row per request. A step that computes prompt tokens of a request
        asking for prompt logprobs runs eagerly and records those first (engine/prompt_logprobs.py)."""
        if wants_prompt_logprobs(scheduled):
            return collect_prompt_logprobs(self.runner, scheduled)
        return self.runner.execute(scheduled)

    def _advance_in_flight(self, failed: list[Request]) -> list[RequestOutput]:
        live, sampled = self.ahead.advance()  # launches the next step, then reads the in-flight tokens
        self._postprocess(live, sampled)
        self.ahead.settle()
        return self._collect([*live, *failed])

    @staticmethod
    def _rows_of(logits: Any, scheduled: list[tuple[Request, int]], ready: list[Request]) -> Any:
        """The logits rows of the requests that sample (mid-prefill rows left out)."""
        if len(ready) == len(scheduled):  # e.g. pure decode: skip the gather and its index copy
            return logits
        rows = [i for i, (r, _) in enumerate(scheduled) if r.num_computed_tokens == len(r.all_token_ids)]
        return logits[rows]

    def _postprocess(self, requests: list[Request], sampled: Any) -> None:
        for request, token, logprobs in zip(requests, sampled.token_ids, sampled.logprobs, strict=True):
            self._emit(request, token, logprobs)

    def _postprocess_runs(self, requests: list[Request], runs: list[Run]) -> None:
        """Several tokens per sequence (a speculative step): a stop on one drops the tokens after it."""
        for request, (tokens, logprobs) in zip(requests, runs, strict=True):
            for token, entry in zip(tokens, logprobs, strict=True):
                if self._emit(request, token, entry):
                    break

    def _emit(self, request: Request, token: int, logprobs: dict[int, float] | None) -> bool:
        """Append one sampled token and apply the stop rules; True when the request finished."""
        request.append_token(token)
        if logprobs is not None:
            request.logprobs.append(logprobs)
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.monotonic()
        status = self._stop_status(request, token)
        if request.grammar is not None:
            status = self._grammar_status(request, token, status)
        if status is not None:
            self.scheduler.finish(request, status)
            return True
        return False

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        # Runs for every sequence on every step: lengths read once, no property calls.
        params = request.params
        num_tokens = len(request.all_token_ids)
        num_output = num_tokens - len(request.prompt_token_ids)
        min_reached = num_output > params.min_tokens
        if token in self.eos_token_ids and not params.ignore_eos and min_reached:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids and min_reached:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        detok = self.groups[request.parent_id or request.request_id].detoks[request.index]
        stop = detok.add_token(token, check_stop=min_reached)
        if stop is not None:
            request.stop_reason = stop
            return RequestStatus.FINISHED_STOPPED
        if num_output >= (params.max_tokens or 0) or num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _grammar_status(request: Request, token: int, status: RequestStatus | None) -> RequestStatus | None:
        """Advance the sequence's grammar by its new token: complete -> stopped; a token it refuses (only
        possible if the mask was not applied) fails this request alone."""
        if not request.grammar.accept(token):
            if status is RequestStatus.FINISHED_STOPPED:
                return status  # e.g. a stop string ended it mid-grammar: its text stands
            request.error = f"structured output: the grammar refused a token ({request.grammar.error})"
            return RequestStatus.FINISHED_ERROR
        if status is None and request.grammar.done:
            return RequestStatus.FINISHED_STOPPED
        return status

    def _collect(self, touched: list[Request]) -> list[RequestOutput]:
        by_group: dict[str, list[Request]] = {}
        for request in touched:
            by_group.setdefault(request.parent_id or request.request_id, []).append(request)
        outputs = []
        for group_id, changed in by_group.items():
            group = self.groups[group_id]
            output = build_output(group, changed)
            if output.finished:
                del self.groups[group_id]
            outputs.append(output)
        return outputs

    def _wait_idle(self) -> None:
        """Nothing could run (e.g. every waiting request's adapter is still loading): wait, don't spin."""
        if not self.scheduler.has_unfinished():
            return
        if self.adapter_cache is not None and self.adapter_cache.has_pending_loads:
            self.adapter_cache.wait_for_loads(timeout=0.05)
        else:
            time.sleep(0.002)  # e.g. an evicted adapter draining: its slot frees at a release, soon

    # ---- operations ----
    def evict_adapter(self, content_hash: str) -> None:
        self.adapter_cache.evict(content_hash)

    def stats(self) -> EngineStats:
        running = self.scheduler.running
        return EngineStats(
            running=len(running),
            waiting=self.scheduler.num_waiting,
            kv_usage=self.block_manager.usage,
            num_kv_blocks=self.block_manager.num_blocks,
            prefix_hit_rate=self.block_manager.stats.hit_rate,
            prefix_queried_tokens=self.block_manager.stats.queried_tokens,
            prefix_hit_tokens=self.block_manager.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            adapter_cache=dict(self.adapter_cache.stats()) if self.adapter_cache is not None else {},
            running_adapters=[r.lora.lora_name for r in running if r.lora is not None],
            waiting_adapters=[r.lora.lora_name for r in self.scheduler.waiting() if r.lora is not None],
            spec_decode=self.spec.stats.as_dict() if self.spec is not None else {},
        )

    def close(self) -> None:
        self.grammars.close()
        if self.adapter_cache is not None:
            self.adapter_cache.close()
        self.runner.close()  # tensor parallel: ends the workers
