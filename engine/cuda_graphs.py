"""Decode and small extend steps replayed from CUDA graphs, one graph per (token bucket, sequence bucket,
LoRA module groups in use).

A decode step (one new token per sequence) launches hundreds of small kernels; at small batches the
launch gaps cost more than the kernels. Capturing the whole forward once per bucket and replaying it
removes them. A graph replays fixed device addresses, so every per-step input lives in a fixed buffer
sized for the largest bucket, and a step only writes new contents:

  token ids, positions, cache slots, block tables, sequence lengths, query offsets,
  and the LoRA token -> slot grouping (sorted token ids, per-segment slot / start / length)

The grouping is built on the host (B values) and copied, so nothing inside the graph depends on the
slot mix: the kernels' grids depend only on the bucket and the number of slots. Rows past the real batch
are padding: slot -1 (no KV write, no LoRA), a one-token context in block 0, results never read.
Whether a module group needs LoRA launches is a host decision; it picks the graph (up to 16 variants per
bucket) instead of skipping launches inside one. The base, all-groups and q/k/v/o-only variants are
captured at start;
another variant borrows a wider captured graph (all groups; the widest extend sequence bucket) until it
has been asked for CAPTURE_AFTER times, then is captured, so a new mix of adapter targets or sequence
count never stalls a step for a capture at first sight.

Small extend steps (a prompt's last chunk after a prefix-cache hit, a few sequences and up to
EXTEND_TOKENS[-1] tokens) are launch-bound the same way: they use token buckets EXTEND_TOKENS and sequence
buckets EXTEND_SEQS. Their buffers hold one more sequence row, the padding sequence, which owns every
padding token (slot -1, positions 0.., block 0); unused sequence rows have no tokens. Logits are taken
inside the graph at each real sequence's last token.

Inputs travel through pinned host buffers (non-blocking copies); the only host sync of a decode step is
the sampler reading back the new tokens.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from engine.ops import MODULE_GROUPS, AttentionBatch, LoRABatch
from kernels.lora import LoRAMeta

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner
    from engine.request import Request

log = logging.getLogger(__name__)

GroupMask = tuple[bool, ...] | None  # None: no adapter in the step, no LoRA launches at all
GraphKey = tuple[int, int, GroupMask]  # (tokens, sequences, mask); decode keys have tokens == sequences
EXTEND_TOKENS = (16, 32, 64, 128, 256)
EXTEND_SEQS = (1, 2, 4, 8)
CAPTURE_AFTER = 64  # uses of a variant before it is captured (see DecodeGraphs._pick)
# Adapters on q/k/v/o only (the most common PEFT target set): its variants are captured at start too.
ATTENTION_ONLY = (True, True, False, False)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 32, of 16 up to 128, of 32 beyond; the last is max_batch."""
    sizes: list[int] = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        step = 8 if size < 32 else 16 if size < 128 else 32
        size = size * 2 if size < 8 else size + step
    sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Fixed input buffers for decode batches of up to `max_batch` sequences and for small extend steps,
    and their graphs.

    `capture=False` runs the same forward eagerly over the same buffers: the CPU tests use it to check
    the buffer layout (padding, grouping) against the runner's eager path."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int, capture: bool = True) -> None:
        self.runner = runner
        self.capture_enabled = capture
        self.buckets = bucket_sizes(max_batch)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        dev = runner.device
        pin = dev.type == "cuda"
        self.num_slots = max(runner.adapter_cache.slots.num_slots, 1)
        vocab = runner.model.config.vocab_size

        def host(*shape: int, dtype: torch.dtype) -> Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        # Host staging (pinned on CUDA) and the device buffers the graphs read; numpy views for fast fills.
        # The padding sequence's context (up to a whole bucket) must fit one block-table row.
        room = min(max(runner.config.max_num_batched_tokens, 16), max_blocks * runner.block_size)
        self.extend_tokens = [t for t in EXTEND_TOKENS if t <= room]  # may be empty: no extend graphs
        self.extend_seqs = [b for b in EXTEND_SEQS if b <= max_batch]
        tokens = max([max_batch, *self.extend_tokens])
        rows = max(max_batch, self.extend_seqs[-1] + 1)  # + 1: an extend step's padding sequence
        self.h_ids = host(tokens, dtype=torch.int64)
        self.h_pos = host(tokens, dtype=torch.int64)
        self.h_slot_mapping = host(tokens, dtype=torch.int64)
        self.h_tables = host(rows, max_blocks, dtype=torch.int32)
        self.h_seq_lens = host(rows, dtype=torch.int32)
        self.h_query_start = host(rows + 1, dtype=torch.int32)
        self.h_last = host(rows, dtype=torch.int64)  # extend steps: each sequence's last token
        self.h_token_slots = host(tokens, dtype=torch.int32)
        self.h_sorted = host(tokens, dtype=torch.int32)
        self.h_segs = host(3, self.num_slots, dtype=torch.int32)  # seg slots, starts, lens
        self.d_ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.d_pos = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.d_slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=dev)
        self.d_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=dev)
        self.d_seq_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.d_query_start = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        self.d_last = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.d_token_slots = torch.full((tokens,), -1, dtype=torch.int32, device=dev)
        self.d_sorted = torch.arange(tokens, dtype=torch.int32, device=dev)
        self.d_segs = torch.zeros(3, self.num_slots, dtype=torch.int32, device=dev)
        self.d_segs[0].fill_(-1)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=dev)
        self._copied: Any = None  # CUDA event of the last host -> device copy
        self.graphs: dict[GraphKey, Any] = {}
        self.pool: Any = torch.cuda.graph_pool_handle() if capture else None
        self.capture_seconds = 0.0
        self.replays = 0
        self.capture_after = CAPTURE_AFTER
        self.misses: dict[GraphKey, int] = {}  # requests for variants not captured yet
        self.borrowed = 0  # steps that replayed a wider variant than they needed
        self.extend_steps = 0  # extend steps run through the buffers (replayed or, without capture, eager)
        self.ahead_steps = 0  # decode steps launched before the host had their tokens (async scheduling)
        self._num_segments = 0
        self.broken = False

    # ---- the runner's side ----------------------------------------------------------------------------

    def accepts(self, batch: list[tuple[Request, int]]) -> bool:
        """A pure decode batch (one token per sequence) up to max_batch sequences, or a small extend step
        (up to EXTEND_SEQS[-1] sequences and EXTEND_TOKENS[-1] tokens); every block table fits."""
        if self.broken or not batch or any(len(r.block_table) > self.max_blocks for r, _ in batch):
            return False
        if all(n == 1 for _, n in batch):
            return len(batch) <= self.max_batch
        tokens = sum(n for _, n in batch)
        return (
            bool(self.extend_tokens)
            and len(batch) <= self.extend_seqs[-1]
            and tokens <= self.extend_tokens[-1]
        )

    @torch.inference_mode()
    def run(self, batch: list[tuple[Request, int]], input_ids: Tensor | None = None) -> Tensor | None:
        """Same contract as ModelRunner.execute for a batch `accepts` took: float32 logits [B, V].
        The result is a view of a buffer the next step overwrites. None: a capture failed, run eager.
        input_ids: a decode step ahead of the host's tokens (ModelRunner.execute); they are copied into
        the token buffer on the device, after the host's upload."""
        size = len(batch)
        decode = all(n == 1 for _, n in batch)
        if decode:
            tokens = seqs = next(b for b in self.buckets if b >= size)
        else:
            tokens = next(t for t in self.extend_tokens if t >= sum(n for _, n in batch))
            seqs = next(b for b in self.extend_seqs if b >= size)
        mask = self._mask_of(batch)
        key = self._pick(tokens, seqs, mask)
        tokens, seqs = key[0], key[1]
        if decode:
            self._fill(batch, tokens, ahead=input_ids is not None)
        else:
            self._fill_extend(batch, tokens, seqs)
            self.extend_steps += 1
        self._upload(tokens, seqs + (tokens != seqs))
        if input_ids is not None:
            self.d_ids[:size].copy_(input_ids, non_blocking=True)
            self.ahead_steps += 1
        if not self.capture_enabled:
            self._forward(key)
        else:
            graph = self.graphs.get(key)
            if graph is None:
                try:
                    graph = self._capture(key)
                except RuntimeError:
                    # Never fail a step for a graph: from now on every step runs eager.
                    log.exception(
                        "graph capture failed (tokens %d, sequences %d, groups %s); graphs off", *key
                    )
                    self.broken = True
                    return None
            graph.replay()
            self.replays += 1
        return self.logits[:size]

    def _pick(self, tokens: int, seqs: int, mask: GroupMask) -> GraphKey:
        """The graph to replay: the exact variant when captured; else, until it has been asked for
        `capture_after` times, a captured one that computes the same thing with more work: the widest
        extend sequence bucket (its extra rows are empty) and/or the all-groups mask (its extra LoRA
        launches compute zeros: rank 0 in every slot of the groups no adapter of the step targets).
        Capturing costs ~0.35 s of a step on an 8B model; borrowing the all-groups graph for a q/k/v/o
        batch cost ~2 ms a step on an H200 (B=64), empty extend rows far less: rent, then buy, so the
        overhead stays bounded whichever way the traffic goes."""
        key = (tokens, seqs, mask)
        if not self.capture_enabled or key in self.graphs:
            return key
        self.misses[key] = self.misses.get(key, 0) + 1
        if self.misses[key] >= self.capture_after:
            return key
        wide = seqs if tokens == seqs else self.extend_seqs[-1]
        # mask None never borrows a LoRA variant: without adapters the step's grouping is not filled in.
        masks = [mask] if mask is None else [mask, all_groups_mask()]
        for alt in ((tokens, s, m) for m in masks for s in dict.fromkeys((seqs, wide))):
            if alt in self.graphs:
                self.borrowed += 1
                return alt
        return key

    def _mask_of(self, batch: list[tuple[Request, int]]) -> GroupMask:
        """Module groups any adapter of the batch targets (None: no adapter). Slots out of range are left
        to the fill's check."""
        slots = self.runner.adapter_cache.slots
        used = sorted({r.lora_slot for r, _ in batch if 0 <= r.lora_slot < slots.num_slots})
        if not used:
            return None
        active = slots.host_ranks[:, :, used] > 0  # [L, G, used]
        return tuple(bool(g) for g in active.any(dim=2).any(dim=0).tolist())

    @torch.inference_mode()
    def capture_all(self, masks: list[GroupMask]) -> None:
        """Capture every decode bucket and the one- and widest-sequence extend buckets for these group
        masks now (at start), largest first so that smaller graphs reuse the larger ones' pool memory.
        Other variants are borrowed, then captured (`_pick`)."""
        for mask in masks:
            widths = dict.fromkeys((self.extend_seqs[-1], 1))
            keys = [(t, b, mask) for t in reversed(self.extend_tokens) for b in widths]
            keys += [(b, b, mask) for b in reversed(self.buckets)]
            for key in keys:
                if key not in self.graphs:
                    self._capture(key)

    # ---- internals ------------------------------------------------------------------------------------

    def _fill(self, batch: list[tuple[Request, int]], bucket: int, ahead: bool = False) -> None:
        """ahead: each request's token at num_computed_tokens == num_tokens is not on the host yet (its
        id arrives on the device, `run`); 0 holds its place here."""
        bs = self.runner.block_size
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies read these host buffers
        ids, pos, slots = self.h_ids.numpy(), self.h_pos.numpy(), self.h_slot_mapping.numpy()
        tables, seq_lens, lora = self.h_tables.numpy(), self.h_seq_lens.numpy(), self.h_token_slots.numpy()
        for i, (req, _) in enumerate(batch):
            p = req.num_computed_tokens
            table = req.block_table
            # ahead: the token at p is the one not on the host yet
            position_ok = p == req.num_tokens if ahead else p < req.num_tokens
            if not position_ok or len(table) * bs < p + 1:
                raise ValueError(f"request {req.request_id}: cannot compute token {p}")
            if not -1 <= req.lora_slot < self.runner.adapter_cache.slots.num_slots:
                raise ValueError(f"request {req.request_id}: lora slot {req.lora_slot} out of range")
            ids[i] = 0 if ahead else req.all_token_ids[p]
            pos[i] = p
            tables[i, : len(table)] = table
            slots[i] = table[p // bs] * bs + p % bs
            seq_lens[i] = p + 1
            lora[i] = req.lora_slot
        size = len(batch)
        # Padding rows: no KV write, a one-token context in block 0, no adapter.
        ids[size:bucket], pos[size:bucket], slots[size:bucket] = 0, 0, -1
        tables[size:bucket, 0], seq_lens[size:bucket], lora[size:bucket] = 0, 1, -1
        self.h_query_start.numpy()[: bucket + 1] = np.arange(bucket + 1)
        self._check_and_group(size, bucket)

    def _fill_extend(self, batch: list[tuple[Request, int]], tokens: int, seqs: int) -> None:
        """Sequence rows 0..B-1 real, B..seqs-1 empty, row `seqs` the padding sequence."""
        bs, vocab = self.runner.block_size, self.runner.model.config.vocab_size
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies read these host buffers
        ids, pos, slots = self.h_ids.numpy(), self.h_pos.numpy(), self.h_slot_mapping.numpy()
        tables, seq_lens, lora = self.h_tables.numpy(), self.h_seq_lens.numpy(), self.h_token_slots.numpy()
        starts, last = self.h_query_start.numpy(), self.h_last.numpy()
        t = 0
        for i, (req, n) in enumerate(batch):
            p, end, table = req.num_computed_tokens, req.num_computed_tokens + n, req.block_table
            if n <= 0 or end > req.num_tokens or len(table) * bs < end:
                raise ValueError(f"request {req.request_id}: cannot compute tokens [{p}, {end})")
            if not -1 <= req.lora_slot < self.runner.adapter_cache.slots.num_slots:
                raise ValueError(f"request {req.request_id}: lora slot {req.lora_slot} out of range")
            positions = np.arange(p, end)
            ids[t : t + n] = req.all_token_ids[p:end]
            pos[t : t + n] = positions
            tables[i, : len(table)] = table
            slots[t : t + n] = tables[i, positions // bs].astype(np.int64) * bs + positions % bs
            lora[t : t + n] = req.lora_slot
            seq_lens[i], starts[i], last[i] = end, t, t + n - 1
            t += n
        if ids[:t].min() < 0 or ids[:t].max() >= vocab:
            # On CUDA an out-of-range embedding index is a device-side assert that kills the whole engine.
            raise ValueError(f"token ids outside [0, {vocab})")
        size, pad = len(batch), tokens - t
        starts[size : seqs + 1], seq_lens[size:seqs], last[size:seqs] = t, 0, 0  # empty rows
        # The padding sequence: every padding token, positions 0.., context in block 0, no writes, no adapter.
        ids[t:tokens], pos[t:tokens], slots[t:tokens], lora[t:tokens] = 0, np.arange(pad), -1, -1
        tables[seqs, : -(-tokens // bs)], seq_lens[seqs], starts[seqs + 1] = 0, pad, tokens
        self._check_and_group(size, tokens)

    def _check_and_group(self, size: int, tokens: int) -> None:
        """Block ids of the real rows in range; the LoRA grouping of the step's tokens (when any has one)."""
        num_blocks = self.runner.num_kv_blocks
        tables, lora = self.h_tables.numpy(), self.h_token_slots.numpy()
        # Entries past a row's length are stale ids that passed this same check before: checking the whole
        # rows is a sound (and vectorised) version of the eager path's per-request range check.
        rows = tables[:size]
        if rows.size and (rows.min() < 0 or rows.max() >= num_blocks):
            # A wrong block id would read or overwrite another sequence's (another tenant's) KV.
            raise ValueError(f"block ids outside [0, {num_blocks})")
        if (lora[:tokens] >= 0).any():
            self._group_tokens(lora[:tokens])

    def _group_tokens(self, token_slots: np.ndarray) -> None:
        """The LoRAMeta contents of make_lora_meta, computed on the host for B tokens."""
        keys = np.where(token_slots < 0, self.num_slots, token_slots)
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=self.num_slots + 1)[: self.num_slots]
        present = np.flatnonzero(counts)
        starts = np.cumsum(counts) - counts
        segs = self.h_segs.numpy()
        segs[0].fill(-1)
        segs[1:].fill(0)
        k = len(present)
        segs[0, :k], segs[1, :k], segs[2, :k] = present, starts[present], counts[present]
        self.h_sorted.numpy()[: len(order)] = order
        self._num_segments = k

    def _upload(self, tokens: int, rows: int) -> None:
        pairs = (
            (self.d_ids, self.h_ids, tokens),
            (self.d_pos, self.h_pos, tokens),
            (self.d_slot_mapping, self.h_slot_mapping, tokens),
            (self.d_token_slots, self.h_token_slots, tokens),
            (self.d_sorted, self.h_sorted, tokens),
            (self.d_tables, self.h_tables, rows),
            (self.d_seq_lens, self.h_seq_lens, rows),
            (self.d_last, self.h_last, rows),
            (self.d_query_start, self.h_query_start, rows + 1),
        )
        for dst, src, n in pairs:
            dst[:n].copy_(src[:n], non_blocking=True)
        self.d_segs.copy_(self.h_segs, non_blocking=True)
        if self.runner.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _lora_batch(self, tokens: int, seqs: int, mask: GroupMask) -> LoRABatch | None:
        if mask is None:
            return None
        weights = self.runner.adapter_cache.slots
        # Captured graphs bake launch shapes from num_segments; assume one adapter per sequence (the
        # many-tenant case). Correctness does not depend on it, only block sizes.
        segments = min(seqs, self.num_slots) if self.capture_enabled else self._num_segments
        meta = LoRAMeta(
            token_slots=self.d_token_slots[:tokens],
            sorted_token_ids=self.d_sorted[:tokens],
            seg_slots=self.d_segs[0],
            seg_starts=self.d_segs[1],
            seg_lens=self.d_segs[2],
            num_segments=segments,
        )
        layers = self.runner.model.config.num_layers
        active = [list(mask) for _ in range(layers)]
        return LoRABatch(
            meta, weights.a, weights.b, weights.scales, weights.ranks, self.runner.ops, active,
            self.runner.lora_stream,
        )  # fmt: skip

    def _forward(self, key: GraphKey) -> None:
        tokens, seqs, mask = key
        extend = tokens != seqs  # decode keys have one token per sequence; extend steps more
        rows = seqs + 1 if extend else seqs
        attn = AttentionBatch(
            slot_mapping=self.d_slot_mapping[:tokens],
            block_tables=self.d_tables[:rows],
            seq_lens=self.d_seq_lens[:rows],
            query_start_loc=self.d_query_start[: rows + 1],
        )
        model = self.runner.model.model
        hidden = model(
            self.d_ids[:tokens],
            self.d_pos[:tokens],
            self.runner.kv_caches,
            attn,
            self._lora_batch(tokens, seqs, mask),
            self.runner.ops,
        )  # [tokens, H]
        if extend:
            hidden = hidden.index_select(0, self.d_last[:seqs])  # [seqs, H]: each sequence's last token
        self.logits[:seqs].copy_(model.compute_logits(hidden))

    def _capture(self, key: GraphKey) -> Any:
        start = time.perf_counter()
        # Warm-up on a side stream compiles the Triton kernels and creates library handles, which a
        # capture cannot do. Its KV writes are the ones the replay makes (same inputs, same slots).
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            self._forward(key)
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader thread pins host memory (cudaHostAlloc) at any time; in the
        # default global mode that call from another thread invalidates the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._forward(key)
        self.graphs[key] = graph
        self.capture_seconds += time.perf_counter() - start
        return graph


def all_groups_mask() -> tuple[bool, ...]:
    return (True,) * len(MODULE_GROUPS)


def setup_decode_graphs(runner: ModelRunner, max_model_len: int | None) -> DecodeGraphs | None:
    """The runner's decode graphs when the config asks for them and the device can replay them (CUDA and
    the Triton kernels: the torch references sync on the host), captured at start for the base model and
    for all module groups and for q/k/v/o only. Other group masks borrow one of these, then are captured
    (`DecodeGraphs._pick`)."""
    config = runner.config
    if not (config.cuda_graphs and runner.device.type == "cuda" and runner.ops.name == "triton"):
        return None
    cfg = runner.model.config
    longest = min(x for x in (cfg.max_position_embeddings, max_model_len) if x is not None)
    longest = min(longest, runner.num_kv_blocks * runner.block_size)
    max_blocks = -(-longest // runner.block_size)
    graphs = DecodeGraphs(runner, config.max_num_seqs, max_blocks)
    masks: list[GroupMask] = [None]
    if runner.adapter_cache.slots.num_slots > 0:
        masks += [all_groups_mask(), ATTENTION_ONLY]
    graphs.capture_all(masks)
    return graphs
