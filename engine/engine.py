"""LLMEngine: requests in, one step = schedule -> run -> postprocess, outputs out. Single-threaded.

With n > 1 a request becomes n sequences ("{id}#{i}") that share the prompt's blocks through the prefix
cache; outputs are grouped back under the caller's id.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import Group, build_output
from engine.request import LoRARequest, Request, RequestOutput, RequestStatus
from engine.sampler import Sampler, SamplerOutput, can_sample_ahead, to_device
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


@dataclass(slots=True)
class StepAhead:
    """A decode step on the device whose sampled tokens the host has not read yet (async scheduling)."""

    requests: list[Request]
    tokens: Any  # [B] int64 Tensor on the device, one row per request
    host: Any = field(init=False, default=None)  # its copy in pinned host memory, on its way (CUDA)
    copied: Any = field(init=False, default=None)  # CUDA event: the copy is done

    def __post_init__(self) -> None:
        # The copy starts now, before the next step is queued behind it: a plain .tolist() later would
        # queue its copy after the next step and wait for that one too.
        if self.tokens.is_cuda:
            self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host.copy_(self.tokens, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = self.tokens

    def token_ids(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()  # type: ignore[no-any-return]


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


class LLMEngine:
    def __init__(self, config: EngineConfig, model: Any, runner: Any, adapter_cache: Any) -> None:
        """model: a LoadedModel (engine/model_loader.py) — name, tokenizer, eos_token_ids, config;
        runner: ModelRunner (execute, num_kv_blocks, device); adapter_cache: AdapterCache."""
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
        self.sampler = Sampler(runner.device, config.seed)
        self.groups: dict[str, Group] = {}
        self.async_scheduling: bool = config.async_scheduling
        self._ahead: StepAhead | None = None  # the step launched last, tokens not read yet
        self.num_steps_ahead = 0  # steps launched before the previous one's tokens were read

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_loader: Any = None) -> LLMEngine:
        from engine.adapter_cache import AdapterCache
        from engine.model_loader import load_model
        from engine.model_runner import ModelRunner

        loaded = load_model(config)
        cache = AdapterCache.for_model(config, loaded, adapter_loader)
        return cls(config, loaded, ModelRunner(config, loaded, cache), cache)

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
        if lora is not None and lora.content_hash is None:
            raise ValueError(f"adapter {lora.lora_name!r} has no content hash")
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
        if self._ahead is not None:
            return self._step_ahead()
        batch = self.scheduler.schedule()
        scheduled = batch.scheduled
        logits = self.runner.execute(scheduled) if scheduled else None
        self.scheduler.advance(batch)
        ready = [r for r, _ in scheduled if r.num_computed_tokens == len(r.all_token_ids)]
        if ready:
            assert logits is not None
            if self.async_scheduling and len(ready) == len(scheduled) and can_sample_ahead(ready):
                # No row needs its tokens so far to sample: leave them on the device, go on without waiting.
                self._ahead = StepAhead(ready, self.sampler.sample_tensor(logits, ready))
                return self._step_ahead(batch.failed)
            # Pure decode steps sample every row: skip the gather (and its host -> device index copy).
            if len(ready) < len(scheduled):
                rows = [
                    i for i, (r, _) in enumerate(scheduled) if r.num_computed_tokens == len(r.all_token_ids)
                ]
                logits = logits[rows]
            self._postprocess(ready, self.sampler(logits, ready))
        if not batch.scheduled and not batch.failed:
            self._wait_idle()
        return self._collect([*ready, *batch.failed])

    def _step_ahead(self, failed: list[Request] | None = None) -> list[RequestOutput]:
        """Async scheduling. The step in `_ahead` runs on the device, its tokens unread. Launch the next
        decode step first, with those tokens as its input ids (still on the device), then read them and
        do the host's work (detokenize, stop checks, outputs) while the device runs the next step.

        The next step holds every running request that is not certain to stop (max_tokens, context),
        and only when it is the step schedule() would make (Scheduler.schedule_ahead). A request that
        does stop on the token just read (EOS, stop string, abort) computed one token too many in it:
        that token is dropped. Its KV write landed in its own blocks, before any later step can reuse
        them (one device stream), so the results equal those of synchronous steps."""
        current, self._ahead = self._ahead, None
        assert current is not None
        rows = [i for i, r in enumerate(current.requests) if not r.is_finished]  # aborts between steps
        live = [current.requests[i] for i in rows]
        nxt = self._launch_ahead(live, current.tokens, rows)
        token_ids = current.token_ids()  # the step's only wait for the device
        self._postprocess(live, SamplerOutput([token_ids[i] for i in rows], [None] * len(live)))
        if nxt is not None:
            going = [r for r in nxt.requests if not r.is_finished]
            self.scheduler.advance_ahead(going)
            # The rows of requests that just stopped stay in `nxt`: the next harvest skips finished rows.
            self._ahead = nxt if going else None
        return self._collect([*live, *(failed or [])])

    def _launch_ahead(self, live: list[Request], tokens: Any, rows: list[int]) -> StepAhead | None:
        """Schedule and launch the decode step after the one in flight (see _step_ahead), or None."""
        if not live or len(live) != self.scheduler.num_running:
            return None  # e.g. a request in chunked prefill is running too: schedule() decides
        keep = [j for j, r in enumerate(live) if not self._stops_by_length(r)]
        scheduled = self.scheduler.schedule_ahead([live[j] for j in keep])
        if scheduled is None:
            return None
        picked = [rows[j] for j in keep]
        if len(picked) == tokens.shape[0]:
            ids = tokens
        else:  # a request stopped or was aborted: gather the others' rows (index through pinned memory)
            ids = tokens.index_select(0, to_device(tokens.device, picked, torch.int64))
        logits = self.runner.execute(scheduled, input_ids=ids)
        self.num_steps_ahead += 1
        requests = [r for r, _ in scheduled]
        return StepAhead(requests, self.sampler.sample_tensor(logits, requests))

    def _stops_by_length(self, request: Request) -> bool:
        """Will the token in flight end this request by max_tokens or the context (see _stop_status)?"""
        num_tokens = len(request.all_token_ids) + 1
        num_output = num_tokens - len(request.prompt_token_ids)
        return num_output >= (request.params.max_tokens or 0) or num_tokens >= self.max_model_len

    def _postprocess(self, requests: list[Request], sampled: Any) -> None:
        for request, token, logprobs in zip(requests, sampled.token_ids, sampled.logprobs, strict=True):
            request.append_token(token)
            if logprobs is not None:
                request.logprobs.append(logprobs)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = time.monotonic()
            status = self._stop_status(request, token)
            if status is not None:
                self.scheduler.finish(request, status)

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
        )

    def close(self) -> None:
        if self.adapter_cache is not None:
            self.adapter_cache.close()
