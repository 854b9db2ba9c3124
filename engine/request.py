"""The request model shared by scheduler, block manager, model runner and the public outputs. No torch."""

from __future__ import annotations

import enum
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from engine.adapter_format import WEIGHTS_FILE as ADAPTER_WEIGHTS_FILE
from engine.sampling_params import SamplingParams


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # display name only; never part of a cache key
    lora_path: str | None = None  # folder with adapter_config.json + adapter_model.safetensors
    content_hash: str | None = None  # sha256 hex of adapter_model.safetensors; computed from the file if None
    lora_int_id: int = 0  # unused by us; kept for vLLM users' code

    def __post_init__(self) -> None:
        if self.content_hash is not None:
            return
        if self.lora_path is None:
            raise ValueError(f"LoRARequest {self.lora_name!r} needs lora_path or content_hash")
        weights = os.path.join(self.lora_path, ADAPTER_WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise ValueError(f"LoRARequest {self.lora_name!r}: no {ADAPTER_WEIGHTS_FILE} in {self.lora_path}")
        # The content hash, not the name, keys the adapter cache and the prefix cache: two tenants
        # naming different weights alike must never share slots or cached blocks.
        object.__setattr__(self, "content_hash", sha256_file(weights))

    @property
    def key(self) -> str:
        assert self.content_hash is not None
        return self.content_hash


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def snapshot(self) -> RequestMetrics:
        """A copy for outputs that other threads read (dataclasses.replace does the same, ~10x slower)."""
        return RequestMetrics(
            self.arrival_time, self.first_scheduled_time, self.first_token_time, self.finished_time
        )


_ACTIVE = (RequestStatus.WAITING, RequestStatus.RUNNING)


# eq=False: a request is itself, not its field values; field-wise == made every list.remove/`in` over the
# running list build and compare tuples of all the fields of every request before the one looked for.
@dataclass(slots=True, eq=False)
class Request:
    """One sequence. With n > 1 each sample is its own Request (same prompt, own index and seed)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    lora: LoRARequest | None = None
    cache_salt: str | None = None
    fairness_key: str = ""
    # For n > 1: the caller's id and this sample's index in RequestOutput.outputs.
    parent_id: str | None = None
    index: int = 0
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chain hashes of this request's full blocks so far (filled by the block manager).
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    lora_slot: int = -1  # -1 = base model only
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = -1  # -1 until first scheduled: prefix-cache hits, in tokens
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    error: str | None = None  # why it FINISHED_ERROR (e.g. its adapter could not be loaded)
    # One dict {token_id: logprob} per output token when params.logprobs is set.
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # params.prompt_logprobs set: per prompt position so far, the prompt token and the top-k (None for the
    # first token, which has no context). Only the first sample of a group collects them (n > 1 shares
    # the prompt); None when not collected.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Sampler state (a torch.Generator for seeded requests); opaque here so this module stays torch-free.
    generator: Any = None
    # Constrained decoding: this sequence's grammar matcher (engine/structured.py's GrammarState), or None.
    grammar: Any = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    # Read for every row of every step, so worked out once from params (which never change once a
    # request exists). plain_greedy: argmax is all the sampler has to do (no penalties, min_tokens, logprobs,
    # logit_bias or grammar).
    greedy: bool = field(init=False, default=False)
    has_penalties: bool = field(init=False, default=False)
    plain_greedy: bool = field(init=False, default=False)
    # Speculative decoding (engine/spec/): the tokens drafted for this step, verified with it; empty when
    # the sequence does not speculate this step. Never part of all_token_ids outside the verify forward.
    spec_token_ids: list[int] = field(default_factory=list)
    # Whether drafts can be verified row by row with the sampler: nothing in its sampling depends on the
    # tokens before (penalties, min_tokens and a grammar do).
    can_speculate: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must have at least one token")
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        params = self.params
        self.greedy = params.greedy
        self.has_penalties = params.has_penalties
        self.plain_greedy = (
            self.greedy
            and not self.has_penalties
            and not params.min_tokens
            and params.logprobs is None
            and not params.logit_bias
            and params.structured is None
        )
        self.can_speculate = not self.has_penalties and not params.min_tokens and params.structured is None
        if params.prompt_logprobs is not None and self.index == 0 and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def skips_prefix_cache(self) -> bool:
        """A request collecting prompt logprobs computes its whole prompt: cached blocks have no logits."""
        return self.prompt_logprobs is not None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def adapter_hash(self) -> str | None:
        return self.lora.content_hash if self.lora is not None else None

    @property
    def is_finished(self) -> bool:
        return self.status not in _ACTIVE  # what status.finished says, without the enum property call

    @property
    def finish_reason(self) -> str | None:
        status = self.status
        return None if status in _ACTIVE else status.value

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's log-probability at one prompt position, and its rank there (1 = most likely)."""

    logprob: float
    rank: int


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt: str | None = None
    # params.prompt_logprobs set: one entry per prompt token (None for the first), filled once the
    # prompt is computed; None before that and when not asked for.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = None  # set when the request failed (finish_reason "error"), e.g. its adapter
