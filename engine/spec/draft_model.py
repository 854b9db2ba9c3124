"""Drafts from a smaller model with the target's tokenizer: `{"method": "draft_model", "model": PATH}`.

The draft runs greedily, without adapters, on its own ModelRunner (its own paged KV cache, CUDA graphs
on CUDA) and its own BlockManager (no prefix cache). Each sequence has a shadow Request there: the
draft's KV of the sequence's tokens, plus the drafts it fed itself last step. A proposal catches up on the
tokens the target emitted since (one forward, with the last real token's logits giving the first draft)
and then decodes k - 1 more tokens one forward at a time; the shadow's fed drafts that the target did not
accept are rolled back before the next catch-up (their KV lies past the kept length and is overwritten).
Shadows of sequences that stop running (finished, preempted) are freed: the draft recomputes them later.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request
from engine.spec.config import SpeculativeConfig


def draft_engine_config(target: EngineConfig, spec: SpeculativeConfig, num_kv_blocks: int) -> EngineConfig:
    """The draft runner's configuration: the target's device, dtype, block size and step limits."""
    assert spec.model is not None
    return dataclasses.replace(
        target,
        model=spec.model,
        num_kv_blocks=num_kv_blocks,
        kv_cache_bytes=None,
        max_loras=0,
        max_cpu_loras=0,
        adapter_load_processes=0,
        adapter_pinned_pool_mb=0,
        enable_prefix_caching=False,
        async_scheduling=False,
        speculative_config=None,
    )


def load_draft(target: EngineConfig, spec: SpeculativeConfig, loaded: Any) -> tuple[Any, int]:
    """Load the draft's weights (before any KV cache is sized) and split the KV budget: the target gets
    the number of blocks that its budget and the draft's blocks (as many, of the draft's size) fit in.
    loaded: the target's LoadedModel. Returns (the draft's LoadedModel, blocks for each)."""
    from engine.model_loader import load_model
    from engine.model_runner import decide_num_kv_blocks, kv_block_bytes

    draft = load_model(draft_engine_config(target, spec, 1))
    if draft.config.vocab_size != loaded.config.vocab_size:
        raise ValueError(
            f"speculative_config.model: the draft's vocabulary ({draft.config.vocab_size}) is not the "
            f"target's ({loaded.config.vocab_size}); a draft model must share the target's tokenizer"
        )
    if target.num_kv_blocks is not None:
        return draft, target.num_kv_blocks
    cuda_mem = torch.cuda.mem_get_info(loaded.device) if loaded.device.type == "cuda" else None
    blocks = decide_num_kv_blocks(target, loaded, cuda_mem)
    mine = kv_block_bytes(loaded.config, target.block_size, loaded.dtype)
    theirs = kv_block_bytes(draft.config, target.block_size, draft.dtype)
    return draft, max(1, blocks * mine // (mine + theirs))


class DraftModelProposer:
    def __init__(self, runner: Any, block_manager: BlockManager) -> None:
        """runner: a ModelRunner of the draft model (execute); block_manager over its KV blocks."""
        self.runner = runner
        self.block_manager = block_manager
        # Longest sequence the draft can hold (its positions and its step input's block-table rows).
        cfg = runner.model.config
        self.max_len = min(cfg.max_position_embeddings, runner.input.max_blocks * block_manager.block_size)
        self.shadows: dict[str, tuple[Request, int]] = {}  # request id -> (shadow, real tokens it saw)

    @classmethod
    def build(cls, target: EngineConfig, spec: SpeculativeConfig, draft: Any, num_kv_blocks: int) -> Any:
        """draft: the LoadedModel from load_draft; num_kv_blocks: as many as the target has."""
        from engine.adapter_cache import AdapterCache
        from engine.model_runner import ModelRunner

        config = draft_engine_config(target, spec, num_kv_blocks)
        runner = ModelRunner(config, draft, AdapterCache.for_model(config, draft, None))
        return cls(runner, BlockManager(runner.num_kv_blocks, config.block_size, enable_prefix_caching=False))

    def retain(self, running: list[Request]) -> None:
        ids = {r.request_id for r in running}
        for request_id in [i for i in self.shadows if i not in ids]:
            shadow, _ = self.shadows.pop(request_id)
            self.block_manager.free(shadow)

    def _sync(self, request: Request) -> Request:
        """The request's shadow with its fed drafts rolled back to what the target accepted and the
        target's new tokens appended (not yet computed)."""
        real = request.all_token_ids
        entry = self.shadows.get(request.request_id)
        if entry is None:
            shadow = Request(request.request_id, list(request.prompt_token_ids), request.params)
            self.shadows[request.request_id] = (shadow, len(shadow.all_token_ids))
            entry = (shadow, len(shadow.all_token_ids))
        shadow, seen = entry
        tokens = shadow.all_token_ids
        keep = seen
        while keep < min(len(tokens), len(real)) and tokens[keep] == real[keep]:
            keep += 1
        # The last real token is always computed again: its logits give the first draft.
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, keep, len(real) - 1)
        del tokens[keep:]
        tokens.extend(real[keep:])
        return shadow

    def _allocate(self, shadow: Request, n: int) -> bool:
        if self.block_manager.allocate_slots(shadow, n):
            return True
        self.block_manager.free(shadow)  # the draft's pool is full: this sequence goes without drafts
        shadow.num_computed_tokens = 0
        return False

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_lens: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        pending: list[tuple[int, Request]] = []
        for i, request in enumerate(requests):
            if len(request.all_token_ids) + max_lens[i] > self.max_len:
                continue  # past what the draft can hold: no drafts, the target decodes as usual
            pending.append((i, self._sync(request)))
            self.shadows[request.request_id] = (pending[-1][1], len(request.all_token_ids))
        # Catch up, in chunks within the step input's token budget; a row whose last real token is
        # computed has its first draft.
        rows: list[tuple[int, Request]] = []
        budget = self.runner.input.max_tokens
        while pending:
            batch: list[tuple[int, Request, int]] = []
            rest: list[tuple[int, Request]] = []
            room = budget
            for i, shadow in pending:
                if room <= 0:
                    rest.append((i, shadow))  # the next chunk
                    continue
                n = min(len(shadow.all_token_ids) - shadow.num_computed_tokens, room)  # >= 1 (_sync)
                if self._allocate(shadow, n):
                    batch.append((i, shadow, n))
                    room -= n
            pending = rest
            if not batch:
                break
            tokens = self.runner.execute([(s, n) for _, s, n in batch]).argmax(dim=-1).tolist()  # [B]
            for (i, shadow, n), token in zip(batch, tokens, strict=True):
                shadow.num_computed_tokens += n
                if shadow.num_computed_tokens < len(shadow.all_token_ids):
                    pending.append((i, shadow))  # mid catch-up: this row's logits are not a draft
                else:
                    drafts[i].append(token)
                    rows.append((i, shadow))
        # Then one greedy token a forward, each row up to its own max length.
        while rows:
            rows = [(i, s) for i, s in rows if len(drafts[i]) < max_lens[i]]
            for i, shadow in rows:
                shadow.all_token_ids.append(drafts[i][-1])  # fed to the next forward
            rows = [(i, s) for i, s in rows if self._allocate(s, 1)]
            if not rows:
                break
            tokens = self.runner.execute([(s, 1) for _, s in rows]).argmax(dim=-1).tolist()
            for (i, shadow), token in zip(rows, tokens, strict=True):
                shadow.num_computed_tokens += 1
                drafts[i].append(token)
        return drafts
