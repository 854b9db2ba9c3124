"""Model runner: the only engine part that builds tensors. One step = one forward over a flat batch.

It owns the KV cache (sized once, from the memory budget) and turns the scheduler's (request, n) pairs
into the step tensors of docs/internals.md: token ids, positions, cache slots, block tables, sequence
lengths, query offsets and the token -> adapter slot grouping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.cuda_graphs import setup_decode_graphs
from engine.model_loader import LoadedModel, ModelConfig
from engine.ops import AttentionBatch, LoRABatch, get_ops
from engine.request import Request

log = logging.getLogger(__name__)

# CPU default when the config sets no budget: enough for the demo model and small tests, bounded so a
# big model on a laptop does not take all its memory.
CPU_KV_CACHE_BYTES = 256 << 20
# Room kept free on the GPU for activations of one step, on top of an estimate from the step size.
GPU_ACTIVATION_SLACK = 512 << 20


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * element


def decide_num_kv_blocks(config: EngineConfig, model: LoadedModel, cuda_mem: tuple[int, int] | None) -> int:
    """config.num_kv_blocks, else kv_cache_bytes, else (GPU) the free memory under gpu_memory_fraction
    left after weights and adapter slots (already allocated) and an activation reserve, else the CPU default.
    `cuda_mem` is (free, total) bytes from the device, or None on CPU."""
    per_block = kv_block_bytes(model.config, config.block_size, model.dtype)
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_bytes is not None:
        budget = config.kv_cache_bytes
    elif cuda_mem is not None:
        free, total = cuda_mem
        cfg = model.config
        element = torch.empty((), dtype=model.dtype).element_size()
        width = 4 * cfg.hidden_size + 2 * cfg.intermediate_size + cfg.q_size + 2 * cfg.kv_size
        activations = (
            config.max_num_batched_tokens * width * element + config.max_num_seqs * cfg.vocab_size * 4
        )
        budget = free - int(total * (1.0 - config.gpu_memory_fraction)) - activations - GPU_ACTIVATION_SLACK
    else:
        budget = CPU_KV_CACHE_BYTES
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"no memory left for the KV cache (budget {budget} bytes, one block {per_block} bytes); "
            "lower max_loras/max_lora_rank or raise gpu_memory_fraction / kv_cache_bytes"
        )
    return int(blocks)


@dataclass
class StepInputs:
    input_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64
    attn: AttentionBatch
    lora: LoRABatch | None  # None when no token of the step uses an adapter


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LoadedModel, adapter_cache: AdapterCache) -> None:
        self.config = config
        self.model = model
        self.adapter_cache = adapter_cache
        self.device = model.device
        self.block_size = config.block_size
        self.ops = get_ops(config.kernel_backend, self.device)
        cuda_mem = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else None
        self.num_kv_blocks = decide_num_kv_blocks(config, model, cuda_mem)
        cfg = model.config
        shape = (self.num_kv_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches: list[tuple[Tensor, Tensor]] = [
            (
                torch.zeros(shape, dtype=model.dtype, device=self.device),
                torch.zeros(shape, dtype=model.dtype, device=self.device),
            )
            for _ in range(cfg.num_layers)
        ]
        # The LoRA shrink runs on this stream beside the base projection (LoRABatch.linear); None: inline.
        self.lora_stream: Any = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Last: the graphs' warm-up needs the KV cache, and the memory line reports everything above.
        self.graphs = setup_decode_graphs(self, config.max_model_len)
        if self.device.type == "cuda":
            self.log_memory()

    def log_memory(self) -> None:
        """One line at start: what adapter slots, KV cache and graphs took against the memory budget."""
        free, total = torch.cuda.mem_get_info(self.device)
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        g = self.graphs
        graph_part = (
            f"{len(g.graphs)} CUDA graphs ({len(g.buckets)} decode buckets up to {g.max_batch} sequences, "
            f"{len(g.extend_tokens)} extend buckets up to {max(g.extend_tokens, default=0)} tokens for 1 and "
            f"{g.extend_seqs[-1]} sequences; x {len({m for *_, m in g.graphs})} LoRA variants) captured in "
            f"{g.capture_seconds:.1f} s"
            if g is not None
            else "CUDA graphs off"
        )
        log.info(
            "GPU memory: KV cache %.2f GiB (%d blocks), adapter slots %.2f GiB; %s; peak allocated %.2f GiB, "
            "in use on the device %.2f GiB of a %.2f GiB budget (gpu_memory_fraction %.2f of %.2f GiB)",
            kv / 2**30,
            self.num_kv_blocks,
            self.adapter_cache.slots.nbytes / 2**30,
            graph_part,
            torch.cuda.max_memory_allocated(self.device) / 2**30,
            (total - free) / 2**30,
            total * self.config.gpu_memory_fraction / 2**30,
            self.config.gpu_memory_fraction,
            total / 2**30,
        )

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Request, int]], input_ids: Tensor | None = None) -> Tensor:
        """Compute tokens [num_computed, num_computed + n) of each request, writing their KV into its
        blocks. Returns float32 logits [B, V] of each request's last computed token.

        input_ids [B] int64 on the device (async scheduling): a decode step (n = 1 each) whose tokens are
        the previous step's samples, not yet appended on the host: each request computes the token at
        position num_computed_tokens == num_tokens, and its id comes from input_ids."""
        if not batch:
            raise ValueError("empty batch")
        if input_ids is not None and (input_ids.shape != (len(batch),) or any(n != 1 for _, n in batch)):
            raise ValueError("input_ids needs a decode batch and one id per request")
        if self.graphs is not None:
            if self.graphs.accepts(batch):
                logits = self.graphs.run(batch, input_ids)
            else:
                logits = self._run_split(batch) if input_ids is None else None
            if logits is not None:
                return logits
        step = self.prepare(batch, input_ids)
        hidden = self.model.model(
            step.input_ids, step.positions, self.kv_caches, step.attn, step.lora, self.ops
        )
        last = step.attn.query_start_loc[1:].to(torch.int64) - 1  # [B]
        return self.model.model.compute_logits(hidden[last])  # [B, V]

    def _run_split(self, batch: list[tuple[Request, int]]) -> Tensor | None:
        """A step mixing decodes with a small prefill (a new request joining a running batch, chunked
        prefill's usual step) as two graph replays, the decode rows and then the prefill rows, instead of
        one eager forward: the eager step is launch-bound (~2-3x a replay), so reading the weights twice
        still wins. None when either part does not fit a graph (the caller runs the whole step eager)."""
        assert self.graphs is not None
        decode = [i for i, (_, n) in enumerate(batch) if n == 1]
        extend = [i for i, (_, n) in enumerate(batch) if n > 1]
        parts = [[batch[i] for i in decode], [batch[i] for i in extend]]
        if not decode or not extend or not all(self.graphs.accepts(p) for p in parts):
            return None
        first = self.graphs.run(parts[0])
        if first is None:
            return None
        first = first.clone()  # the second replay overwrites the graphs' logits buffer
        second = self.graphs.run(parts[1])  # a failure here leaves the decode rows' KV written: the
        if second is None:  # eager rerun writes the same values again
            return None
        logits = torch.cat([first, second])  # rows in (decode, extend) order
        if decode == list(range(len(decode))):
            return logits
        order = torch.tensor(decode + extend, device=logits.device)
        return torch.empty_like(logits).index_copy_(0, order, logits)

    def prepare(self, batch: list[tuple[Request, int]], input_ids: Tensor | None = None) -> StepInputs:
        """The step's tensors; with input_ids, a decode step ahead of the host's tokens (see execute)."""
        bs = self.block_size
        ahead = int(input_ids is not None)  # the one token past num_tokens each request computes
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_lora: list[int] = []
        seq_lens: list[int] = []
        query_start = [0]
        tables: list[list[int]] = []
        for req, n in batch:
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            if n <= 0 or (start != req.num_tokens if ahead else end > req.num_tokens):
                raise ValueError(f"request {req.request_id}: cannot compute tokens [{start}, {end})")
            if len(req.block_table) * bs < end:
                raise ValueError(f"request {req.request_id}: {len(req.block_table)} blocks for {end} tokens")
            if req.block_table and not 0 <= min(req.block_table) <= max(req.block_table) < self.num_kv_blocks:
                # A wrong block id would read or overwrite another sequence's (another tenant's) KV.
                raise ValueError(f"request {req.request_id}: block ids outside [0, {self.num_kv_blocks})")
            if not -1 <= req.lora_slot < self.adapter_cache.slots.num_slots:
                raise ValueError(f"request {req.request_id}: lora slot {req.lora_slot} out of range")
            token_ids.extend(req.all_token_ids[start:end] if not ahead else [0])  # 0: a placeholder
            positions.extend(range(start, end))
            slots.extend(req.block_table[p // bs] * bs + p % bs for p in range(start, end))
            token_lora.extend([req.lora_slot] * n)
            seq_lens.append(end)
            query_start.append(query_start[-1] + n)
            tables.append(req.block_table)
        if min(token_ids) < 0 or max(token_ids) >= self.model.config.vocab_size:
            # On CUDA an out-of-range embedding index is a device-side assert that kills the whole engine.
            raise ValueError(f"token ids outside [0, {self.model.config.vocab_size})")
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]

        def tensor(values: list[Any], dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        attn = AttentionBatch(
            slot_mapping=tensor(slots, torch.int64),  # [T]
            block_tables=tensor(padded, torch.int32),  # [B, max_blocks]
            seq_lens=tensor(seq_lens, torch.int32),  # [B]
            query_start_loc=tensor(query_start, torch.int32),  # [B+1]
        )
        lora = None
        if any(s >= 0 for s in token_lora):
            # Steps without any adapter skip the LoRA launches entirely.
            weights = self.adapter_cache.slots
            lora = LoRABatch(
                meta=self.ops.make_lora_meta(tensor(token_lora, torch.int32), max(weights.num_slots, 1)),
                a=weights.a,
                b=weights.b,
                scales=weights.scales,
                ranks=weights.ranks,
                ops=self.ops,
                active=weights.active_groups(sorted({s for s in token_lora if s >= 0})),
                stream=self.lora_stream,
            )
        ids = tensor(token_ids, torch.int64) if input_ids is None else input_ids
        return StepInputs(ids, tensor(positions, torch.int64), attn, lora)
