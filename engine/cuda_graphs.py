"""Steps replayed from CUDA graphs: one graph per (bucket, LoRA module groups in use).

A decode step launches hundreds of small kernels; at small batches the launch gaps cost more than the
kernels. Capturing the whole forward once per bucket and replaying it removes them. A graph replays fixed
device addresses: it reads the runner's StepInput (engine/step_input.py), which the runner fills for the
bucket this module picks. This module only picks a bucket, captures and replays.

Buckets (`GraphKey` = tokens, sequences, query_len, mask):
  uniform, query_len q >= 1: every sequence has q query tokens and wants logits for all of them. q = 1 is
      decode (sequence buckets `bucket_sizes`); q = k + 1 verifies k drafted tokens (`verify_lens`).
  ragged, query_len 0: small extend steps (a prompt's last chunk after a prefix-cache hit, a few
      sequences, up to EXTEND_TOKENS[-1] tokens; sequence buckets EXTEND_SEQS), logits at each
      sequence's last token.
Padding rows never write KV and have no adapter; their results are never read.

Whether a module group needs LoRA launches is a host decision; it picks the graph (up to 16 variants per
bucket) instead of skipping launches inside one. The base, all-groups and q/k/v/o-only variants are
captured at start; another variant borrows a wider captured graph (all groups; the widest extend
sequence bucket) until it has been asked for CAPTURE_AFTER times, then is captured, so a new mix of
adapter targets or sequence count never stalls a step for a capture at first sight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from engine.ops import MODULE_GROUPS
from engine.step_input import Batch, Layout, StepInput

log = logging.getLogger(__name__)

GroupMask = tuple[bool, ...] | None  # None: no adapter in the step, no LoRA launches at all
GraphKey = tuple[int, int, int, GroupMask]  # (tokens, sequences, query_len: 0 = ragged, mask)
# The forward over the step input: logits [layout.num_logits, V] (the runner's; captured and replayed).
Forward = Callable[[Layout, GroupMask], Tensor]
EXTEND_TOKENS = (16, 32, 64, 128, 256)
EXTEND_SEQS = (1, 2, 4, 8)
CAPTURE_AFTER = 64  # uses of a variant before it is captured (see DecodeGraphs.pick)
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


def all_groups_mask() -> tuple[bool, ...]:
    return (True,) * len(MODULE_GROUPS)


class DecodeGraphs:
    """The graphs over one StepInput and their bucket choice.

    `capture=False` runs the same forward eagerly over the same buffers: the CPU tests use it to check
    the buffer layout (padding, grouping) against the runner's eager path."""

    def __init__(
        self,
        step_input: StepInput,
        forward: Forward,
        max_batch: int,
        vocab_size: int,
        capture: bool = True,
        verify_lens: Sequence[int] = (),
    ) -> None:
        self.input, self.forward = step_input, forward
        self.capture_enabled = capture
        self.max_batch = min(max_batch, step_input.max_rows)
        self.buckets = bucket_sizes(self.max_batch)
        self.max_blocks = step_input.max_blocks
        # The padding sequence's context (up to a whole bucket) must fit one block-table row.
        room = min(step_input.max_tokens, self.max_blocks * step_input.block_size)
        self.extend_tokens = [t for t in EXTEND_TOKENS if t <= room]  # may be empty: no extend graphs
        self.extend_seqs = [b for b in EXTEND_SEQS if b <= self.max_batch and b < step_input.max_rows]
        # Verify steps: k + 1 query tokens per sequence, as many sequences as fit the token buffers.
        self.verify = {
            q: [b for b in self.buckets if b * q <= step_input.max_tokens]
            for q in sorted(set(verify_lens))
            if q > 1 and -(-q // step_input.block_size) <= self.max_blocks
        }
        self.verify = {q: b for q, b in self.verify.items() if b}
        rows = max([self.max_batch, self.extend_seqs[-1]] + [b[-1] * q for q, b in self.verify.items()])
        self.logits = torch.zeros(rows, vocab_size, dtype=torch.float32, device=step_input.device)
        self.graphs: dict[GraphKey, Any] = {}
        self.pool: Any = torch.cuda.graph_pool_handle() if capture else None
        self.capture_seconds = 0.0
        self.replays = 0
        self.capture_after = CAPTURE_AFTER
        self.misses: dict[GraphKey, int] = {}  # requests for variants not captured yet
        self.borrowed = 0  # steps that replayed a wider variant than they needed
        self.extend_steps = 0  # ragged steps run through the buffers (replayed or, without capture, eager)
        self.ahead_steps = 0  # decode steps launched before the host had their tokens (async scheduling)
        self.broken = False

    # ---- the runner's side ----------------------------------------------------------------------------

    def bucket(self, batch: Batch, all_logits: bool = False) -> tuple[int, int, int] | None:
        """(tokens, sequences, query_len) of the bucket this batch fits, or None (run it eager): a pure
        decode batch up to max_batch sequences; with all_logits, k + 1 tokens for every sequence (a
        `verify_lens` length); without, a small extend step (up to EXTEND_SEQS[-1] sequences and
        EXTEND_TOKENS[-1] tokens)."""
        if self.broken or not batch:
            return None
        size = len(batch)
        q = batch[0][1]
        if all(n == q for _, n in batch) and (q == 1 or all_logits):
            sizes = self.buckets if q == 1 else self.verify.get(q, ())
            seqs = next((b for b in sizes if b >= size), None)
            return None if seqs is None else (seqs * q, seqs, q)
        if all_logits or not self.extend_tokens or size > self.extend_seqs[-1]:
            return None
        tokens = sum(n for _, n in batch)
        if tokens > self.extend_tokens[-1]:
            return None
        return (
            next(t for t in self.extend_tokens if t >= tokens),
            next(b for b in self.extend_seqs if b >= size),
            0,
        )

    def accepts(self, batch: Batch, all_logits: bool = False) -> bool:
        return self.bucket(batch, all_logits) is not None

    def pick(self, bucket: tuple[int, int, int], mask: GroupMask) -> GraphKey:
        """The graph to replay: the exact variant when captured; else, until it has been asked for
        `capture_after` times, a captured one that computes the same thing with more work: the widest
        extend sequence bucket (its extra rows are empty) and/or the all-groups mask (its extra LoRA
        launches compute zeros: rank 0 in every slot of the groups no adapter of the step targets).
        Capturing costs ~0.35 s of a step on an 8B model; borrowing the all-groups graph for a q/k/v/o
        batch cost ~2 ms a step on an H200 (B=64), empty extend rows far less: rent, then buy, so the
        overhead stays bounded whichever way the traffic goes."""
        tokens, seqs, q = bucket
        key = (tokens, seqs, q, mask)
        if not self.capture_enabled or key in self.graphs:
            return key
        self.misses[key] = self.misses.get(key, 0) + 1
        if self.misses[key] >= self.capture_after:
            return key
        wide = seqs if q else self.extend_seqs[-1]
        # mask None never borrows a LoRA variant: without adapters the step's grouping is not filled in.
        masks = [mask] if mask is None else [mask, all_groups_mask()]
        for alt in ((tokens, s, q, m) for m in masks for s in dict.fromkeys((seqs, wide))):
            if alt in self.graphs:
                self.borrowed += 1
                return alt
        return key

    @torch.inference_mode()
    def replay(self, key: GraphKey, ahead: bool = False) -> Tensor | None:
        """Run the graph of `key` over the step input (filled for its bucket). Returns its logits view
        [num_logits, V], which the next replay overwrites; None: a capture failed (run eager)."""
        if key[2] == 0:
            self.extend_steps += 1
        if ahead:
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
                    log.exception("graph capture failed (key %s); graphs off", key)
                    self.broken = True
                    return None
            graph.replay()
            self.replays += 1
        return self.logits[: self.layout(key).num_logits]

    def layout(self, key: GraphKey) -> Layout:
        tokens, seqs, q, _ = key
        # Captured graphs bake launch shapes from num_segments; assume one adapter per sequence (the
        # many-tenant case). Correctness does not depend on it, only block sizes.
        segments = min(seqs, self.input.num_segments_max) if self.capture_enabled else self.input.num_segments
        if q:
            return Layout(tokens, seqs, self.max_blocks, tokens, False, segments)
        return Layout(tokens, seqs + 1, self.max_blocks, seqs, True, segments)

    @torch.inference_mode()
    def capture_all(self, masks: list[GroupMask]) -> None:
        """Capture every decode and verify bucket and the one- and widest-sequence extend buckets for these
        group masks now (at start), largest first so that smaller graphs reuse the larger ones' pool
        memory. Other variants are borrowed, then captured (`pick`). Captures run on the step input's
        start contents (an all-padding step), also after steps have filled it (a benchmark's late set)."""
        self.input.reset()
        for mask in masks:
            widths = dict.fromkeys((self.extend_seqs[-1], 1))
            keys = [(t, b, 0, mask) for t in reversed(self.extend_tokens) for b in widths]
            for q, sizes in self.verify.items():
                keys += [(b * q, b, q, mask) for b in reversed(sizes)]
            keys += [(b, b, 1, mask) for b in reversed(self.buckets)]
            for key in keys:
                if key not in self.graphs:
                    self._capture(key)

    # ---- internals ------------------------------------------------------------------------------------

    def _forward(self, key: GraphKey) -> None:
        layout = self.layout(key)
        self.logits[: layout.num_logits].copy_(self.forward(layout, key[3]))

    def _capture(self, key: GraphKey) -> Any:
        start = time.perf_counter()
        device = self.input.device
        # Warm-up on a side stream compiles the Triton kernels and creates library handles, which a
        # capture cannot do. Its KV writes are the ones the replay makes (same inputs, same slots).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(key)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader thread pins host memory (cudaHostAlloc) at any time; in the
        # default global mode that call from another thread invalidates the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._forward(key)
        self.graphs[key] = graph
        self.capture_seconds += time.perf_counter() - start
        return graph
