"""Model runner: the only engine part that builds tensors. One step = one forward over a flat batch.

It owns the KV cache (sized once, from the memory budget), the step input (engine/step_input.py: the
scheduler's (request, n) pairs as token ids, positions, cache slots, block tables, sequence lengths, query
offsets and the token -> adapter slot grouping) and the CUDA graphs that replay steps over that input.
Under tensor parallelism (engine/parallel/) every rank has one over its part of the model; rank 0's
sends each filled step to the others (`workers`) before its own forward.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.cuda_graphs import (
    ATTENTION_ONLY,
    EXTEND_SEQS,
    EXTEND_TOKENS,
    DecodeGraphs,
    GroupMask,
    all_groups_mask,
)
from engine.kernel_warmup import warm_lora_kernels
from engine.model_config import ModelConfig
from engine.model_loader import LoadedModel
from engine.ops import LoRABatch, get_ops
from engine.sampler import to_device
from engine.step_input import Batch, Layout, StepInput

if TYPE_CHECKING:
    from engine.parallel.driver import Workers
    from engine.parallel.group import TPGroup

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


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: LoadedModel,
        adapter_cache: AdapterCache,
        group: TPGroup | None = None,
    ) -> None:
        """group: this rank's tensor-parallel group (model.config is then the rank's part)."""
        self.config = config
        self.model = model
        self.adapter_cache = adapter_cache
        self.device = model.device
        self.block_size = config.block_size
        self.ops = get_ops(config.kernel_backend, self.device, config.deterministic)
        cuda_mem = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else None
        self.num_kv_blocks = decide_num_kv_blocks(config, model, cuda_mem)
        if group is not None:  # block ids are shared: every rank holds the smallest count
            self.num_kv_blocks = group.min_int(self.num_kv_blocks)
        # Rank 0 of a tensor-parallel group: the workers each step is sent to (engine/parallel/driver.py).
        self.workers: Workers | None = None
        # fully_sharded_loras: each rank's column-parallel shrink is a slice of the rank dimension,
        # all-gathered before the expand (engine/parallel/sharding.py); None: A whole on every rank.
        split = adapter_cache.slots.a_split is not None
        self.lora_gather = group.all_gather_last_dim if group is not None and split else None
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
        longest = min(x for x in (cfg.max_position_embeddings, config.max_model_len) if x is not None)
        longest = min(longest, self.num_kv_blocks * self.block_size)
        self.input = StepInput(
            self.device,
            # Steps never exceed the token budget; graph buckets stay inside these buffers.
            max_tokens=max(config.max_num_batched_tokens, EXTEND_TOKENS[0]),
            max_rows=max(config.max_num_seqs, EXTEND_SEQS[-1] + 1),  # + 1: a graph's padding sequence
            max_blocks=-(-longest // self.block_size),
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            vocab_size=cfg.vocab_size,
            num_slots=adapter_cache.slots.num_slots,
        )
        # Logits columns this rank's forward returns: the vocabulary, or on a tensor-parallel worker its rows.
        vocab_rows = int(model.model.vocab_rows)  # type: ignore[arg-type]
        self.logits_width = cfg.vocab_size if group is None or group.rank == 0 else vocab_rows
        # Last: the graphs' warm-up needs the KV cache, and the memory line reports everything above.
        # Under tensor parallelism every rank captures the same graphs in the same order (their
        # collectives pair up), and the workers replay the key rank 0 picks (engine/parallel/).
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs and self.device.type == "cuda" and self.ops.name == "triton":
            # The torch references sync on the host: graphs need the Triton kernels.
            spec = config.speculative  # verify steps of k + 1 tokens per sequence get graphs too
            self.graphs = self.make_graphs(verify_lens=(spec.num_speculative_tokens + 1,) if spec else ())
            masks: list[GroupMask] = [None]
            if adapter_cache.slots.num_slots > 0:
                masks += [all_groups_mask(), ATTENTION_ONLY]
            self.graphs.capture_all(masks)
        if self.device.type == "cuda" and self.ops.name == "triton":
            # Eager steps' LoRA launch variants (engine/kernel_warmup.py): none compiles mid-step.
            warm_lora_kernels(adapter_cache.slots, self.ops, self.device, self.lora_gather)
        if self.device.type == "cuda" and group is None:
            self.log_memory()  # tensor parallel: one line per rank from engine/parallel/driver.py

    def start_report(self, seconds: float) -> dict[str, float]:
        """What this rank took at start (tensor parallel: logged per rank by rank 0)."""
        params = self.model.model.parameters()
        used = 0.0
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = (total - free) / 2**20
        return {
            "weights_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
            "kv_mib": sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches) / 2**20,
            "kv_blocks": float(self.num_kv_blocks),
            "slots_mib": self.adapter_cache.slots.nbytes / 2**20,
            "device_used_mib": used,
            "seconds": seconds,
        }

    def check_workers(self) -> None:
        """EngineFault when a tensor-parallel worker has died (a no-op on one rank)."""
        if self.workers is not None:
            self.workers.check()

    def close(self) -> None:
        """End the tensor-parallel workers (a no-op on one rank)."""
        if self.workers is not None:
            self.workers.close()

    def make_graphs(
        self, capture: bool = True, max_batch: int | None = None, verify_lens: tuple[int, ...] = ()
    ) -> DecodeGraphs:
        """A fresh set of graphs over this runner's step input (captured on first use); capture=False
        runs the graphs' forwards eagerly (CPU tests of the bucket layouts)."""
        return DecodeGraphs(
            self.input,
            self._graph_forward,
            max_batch or self.config.max_num_seqs,
            self.logits_width,
            capture=capture,
            verify_lens=verify_lens,
        )

    def log_memory(self) -> None:
        """One line at start: what adapter slots, KV cache and graphs took against the memory budget."""
        free, total = torch.cuda.mem_get_info(self.device)
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        g = self.graphs
        graph_part = (
            f"{len(g.graphs)} CUDA graphs ({len(g.buckets)} decode buckets up to {g.max_batch} sequences, "
            f"{len(g.extend_tokens)} extend buckets up to {max(g.extend_tokens, default=0)} tokens for 1 and "
            f"{g.extend_seqs[-1]} sequences, verify lengths {sorted(g.verify)}; "
            f"x {len({m for *_, m in g.graphs})} LoRA variants) captured in {g.capture_seconds:.1f} s"
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
    def execute(self, batch: Batch, input_ids: Tensor | None = None, all_logits: bool = False) -> Tensor:
        """Compute tokens [num_computed, num_computed + n) of each request, writing their KV into its
        blocks. Returns float32 logits [B, V] of each request's last computed token; all_logits: of every
        computed token, rows in batch order ([sum n, V]; e.g. to verify k drafted tokens with n = k + 1).

        input_ids [B] int64 on the device (async scheduling): a decode step (n = 1 each) whose tokens are
        the previous step's samples, not yet appended on the host: each request computes the token at
        position num_computed_tokens == num_tokens, and its id comes from input_ids."""
        if not batch:
            raise ValueError("empty batch")
        self.check_workers()  # a dead tensor-parallel group fails every step, before its input is built
        if input_ids is not None and (input_ids.shape != (len(batch),) or any(n != 1 for _, n in batch)):
            raise ValueError("input_ids needs a decode batch and one id per request")
        if self.graphs is not None:
            logits = self._replay(batch, input_ids, all_logits)
            if logits is None and input_ids is None and not all_logits:
                logits = self._run_split(batch)
            if logits is not None:
                return logits
        layout = self.input.fill(batch, input_ids, all_logits)
        return self.forward_layout(layout, sorted({r.lora_slot for r, _ in batch if r.lora_slot >= 0}))

    @torch.inference_mode()
    def execute_hidden(self, batch: Batch) -> Tensor:
        """execute(), eager, returning the final hidden states [sum n, H] of every computed token (batch
        order) instead of logits: prompt logprobs turn the rows they need into logits a slice at a time
        (`logits`), so a long prefill chunk never holds [sum n, V] float32 logits on the device."""
        if not batch:
            raise ValueError("empty batch")
        self.check_workers()
        layout = self.input.fill(batch, None, all_logits=True)
        used = sorted({r.lora_slot for r, _ in batch if r.lora_slot >= 0})
        return self.forward_layout(layout, used, hidden_only=True)

    def forward_layout(self, layout: Layout, used: list[int], hidden_only: bool = False) -> Tensor:
        """The eager forward of the filled step input; `used`: the adapter slots of the step. On rank 0 of
        a tensor-parallel group the step goes to the workers first, and any failure from there on is
        the engine's (the ranks are out of step): EngineFault."""
        active = self.adapter_cache.slots.active_groups(used) if used else None
        if self.workers is None:
            return self._forward(layout, active, hidden_only)
        self.workers.step(self.input.packed, layout, used, hidden_only)
        with self.workers.in_step():
            return self._forward(layout, active, hidden_only)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [R, H] (from execute_hidden) -> float32 logits [R, V], as execute() makes them."""
        model: Any = self.model.model
        if self.workers is None:
            return model.compute_logits(hidden)  # type: ignore[no-any-return]
        self.workers.logits(hidden)
        with self.workers.in_step():
            return model.compute_logits(hidden)  # type: ignore[no-any-return]

    def _replay(self, batch: Batch, input_ids: Tensor | None, all_logits: bool) -> Tensor | None:
        """The step from a graph bucket, or None (it fits none, or a capture failed: run eager)."""
        assert self.graphs is not None
        bucket = self.graphs.bucket(batch, all_logits)
        if bucket is None:
            return None
        key = self.graphs.pick(bucket, self._group_mask(batch))
        self.input.fill(batch, input_ids, all_logits, pad_to=key[:3])  # type: ignore[arg-type]
        ahead = input_ids is not None
        if self.workers is None:
            logits = self.graphs.replay(key, ahead)
        else:
            self.workers.replay(self.input.packed, key, ahead, self.input.num_segments)
            with self.workers.in_step():
                logits = self.graphs.replay(key, ahead)
                if logits is None:  # the workers replayed: an eager rerun here would leave them behind
                    raise RuntimeError(f"graph capture failed on rank 0 (key {key}); try cuda_graphs=False")
        return None if logits is None else logits[: sum(n for _, n in batch) if all_logits else len(batch)]

    def _group_mask(self, batch: Batch) -> GroupMask:
        """Module groups any adapter of the batch targets (None: no adapter). Slots out of range are left
        to the step input's check."""
        slots = self.adapter_cache.slots
        used = sorted({r.lora_slot for r, _ in batch if 0 <= r.lora_slot < slots.num_slots})
        if not used:
            return None
        active = slots.host_ranks[:, :, used] > 0  # [L, G, used]
        return tuple(bool(g) for g in active.any(dim=2).any(dim=0).tolist())

    def _run_split(self, batch: Batch) -> Tensor | None:
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
        first = self._replay(parts[0], None, False)
        if first is None:
            return None
        first = first.clone()  # the second replay overwrites the graphs' logits buffer
        second = self._replay(parts[1], None, False)  # a failure here leaves the decode rows' KV
        if second is None:  # written: the eager rerun writes the same values again
            return None
        logits = torch.cat([first, second])  # rows in (decode, extend) order
        if decode == list(range(len(decode))):
            return logits
        order = to_device(logits.device, decode + extend, torch.int64)
        return torch.empty_like(logits).index_copy_(0, order, logits)

    def _graph_forward(self, layout: Layout, mask: GroupMask) -> Tensor:
        active = None if mask is None else [list(mask)] * self.model.config.num_layers
        return self._forward(layout, active)

    def _forward(self, layout: Layout, active: list[list[bool]] | None, hidden_only: bool = False) -> Tensor:
        """The model over the step input's views: float32 logits [layout.num_logits, V] (hidden_only: the
        final hidden states [layout.tokens, H]). active: [L][G] module groups that need LoRA launches; None:
        no adapter in the step."""
        step = self.input
        lora = None
        if active is not None:
            weights = self.adapter_cache.slots
            lora = LoRABatch(
                step.lora_meta(layout), weights.a, weights.b, weights.scales, weights.ranks, self.ops,
                active, self.lora_stream, weights.shrink_ranks, self.lora_gather,
            )  # fmt: skip
        ids = step.device_buffer("ids")[: layout.tokens]
        positions = step.device_buffer("pos")[: layout.tokens]
        model: Any = self.model.model  # LlamaForCausalLM (an nn.Module to the type checker)
        hidden = model(ids, positions, self.kv_caches, step.attention(layout), lora, self.ops)  # [T, H]
        if hidden_only:
            return hidden  # type: ignore[no-any-return]
        rows = step.logit_rows(layout)
        if rows is not None:
            hidden = hidden.index_select(0, rows)  # [num_logits, H]
        return model.compute_logits(hidden)  # [num_logits, V]
