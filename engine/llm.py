"""The offline API (docs/engine.md): LLM(model=...).generate(prompts, SamplingParams(...), lora_request=...)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, TypeVar, cast

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import CompletionOutput, LoRARequest, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
T = TypeVar("T")
# Offline batches at least this large get a progress bar unless use_tqdm says otherwise.
_TQDM_FROM = 32


class LLM:
    def __init__(self, model: str, adapter_loader: Any = None, **config: Any) -> None:
        """model: a Hugging Face model folder; config: any EngineConfig field (device, dtype, max_loras,
        max_cpu_loras, max_lora_rank, block_size, num_kv_blocks, max_num_batched_tokens, ...)."""
        self.config = EngineConfig(model=model, **config)
        self.engine = LLMEngine.from_config(self.config, adapter_loader)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        cache_salt: str | Sequence[str | None] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order, each with all its n completions. Per-prompt arguments
        take a single value (used for every prompt) or a list as long as `prompts`."""
        batch = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(batch), "sampling_params")
        loras = _per_prompt(lora_request, len(batch), "lora_request")
        salts: list[str | None] = _per_prompt(cache_salt, len(batch), "cache_salt")
        ids: list[str] = []
        try:
            for prompt, p, lora, salt in zip(batch, params, loras, salts, strict=True):
                request_id = f"llm-{next(self._ids)}"
                token_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
                text = prompt if isinstance(prompt, str) else None
                self.engine.add_request(
                    request_id, list(token_ids), p, lora=lora, cache_salt=salt, prompt=text
                )
                ids.append(request_id)
            return self._run(ids, use_tqdm if use_tqdm is not None else len(batch) >= _TQDM_FROM)
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            # A step that failed half-way may have registered blocks whose KV was never written.
            self.engine.block_manager.reset_prefix_cache()
            raise

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        latest: dict[str, dict[int, CompletionOutput]] = {i: {} for i in ids}
        bar = _progress(len(ids)) if show_progress else None
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.error is not None:
                    raise RuntimeError(f"request failed: {out.error}")
                for completion in out.outputs:
                    latest[out.request_id][completion.index] = completion
                if out.finished:
                    completions = [latest[out.request_id][i] for i in sorted(latest[out.request_id])]
                    final[out.request_id] = dataclasses.replace(out, outputs=completions)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]  # one prompt given as token ids
    for p in items:
        if not isinstance(p, str) and not (isinstance(p, list) and all(isinstance(t, int) for t in p)):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(p).__name__}")
    return cast("list[Prompt]", items)


def _per_prompt(value: T | Sequence[T], count: int, name: str) -> list[T]:
    if isinstance(value, list | tuple):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count  # type: ignore[list-item]


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req")
