"""One step's input: the tensors every forward reads, built once per step by one builder.

The model runner owns one `StepInput`: persistent host buffers (pinned on CUDA) and their device twins,
sized at start for the largest step. `fill` writes a batch into the host buffers, checks it (positions,
token ids, block ids, LoRA slots), groups its tokens by adapter slot and copies everything to the device
without blocking. Eager forwards read views of the device buffers cut to the step; CUDA graphs read the
same buffers cut to their bucket (a graph replays fixed addresses, so the buffers never move).

A step gives each sequence any number of query tokens: a prefill chunk, 1 to decode, k + 1 to verify k
drafted tokens. Two layouts:
  uniform (every row has `query_len` tokens): row i owns tokens [i*q, (i+1)*q); padding rows have q tokens
      at positions 0..q-1 in block 0 and write nothing. Decode is the q = 1 case.
  ragged: rows own consecutive token runs; a graph bucket adds empty rows and one padding sequence (the
      row after the last) that owns every padding token.
Logits are computed for `logit_idx` (each row's last token, or every token when the caller asks for all
of them, e.g. to verify drafts); no gather when every token is wanted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.ops import AttentionBatch
from engine.request import Request
from kernels.lora import LoRAMeta

Batch = list[tuple[Request, int]]  # (request, query tokens): computes [num_computed, num_computed + n)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a filled step sits in the buffers: the views a forward reads."""

    tokens: int  # token rows, padding included
    rows: int  # sequence rows, empty and padding rows included
    width: int  # block-table columns read
    num_logits: int  # logit rows (padding included for graph buckets)
    gather: bool  # logits at logit_idx[:num_logits]; False: at every token
    num_segments: int  # LoRA segments in use (0: no token has an adapter)


class StepInput:
    """The runner's step buffers (module docstring); `fill` is the only writer."""

    def __init__(
        self,
        device: torch.device,
        max_tokens: int,
        max_rows: int,
        max_blocks: int,
        block_size: int,
        num_kv_blocks: int,
        vocab_size: int,
        num_slots: int,
    ) -> None:
        self.device = device
        max_tokens = max(max_tokens, max_rows)  # so that a decode row always has a token row
        self.max_tokens, self.max_rows, self.max_blocks = max_tokens, max_rows, max_blocks
        self.block_size, self.num_kv_blocks, self.vocab_size = block_size, num_kv_blocks, vocab_size
        self.num_slots = num_slots  # adapter slots in use; 0: no adapters
        self.num_segments_max = max(num_slots, 1)
        pin = device.type == "cuda"
        t, r = max_tokens, max_rows
        specs: list[tuple[str, tuple[int, ...], torch.dtype, int | None]] = [
            ("ids", (t,), torch.int64, 0),
            ("pos", (t,), torch.int64, 0),
            ("slot_mapping", (t,), torch.int64, -1),
            ("token_slots", (t,), torch.int32, -1),
            ("sorted", (t,), torch.int32, None),
            ("logit_idx", (max(t, r),), torch.int64, 0),
            ("tables", (r, max_blocks), torch.int32, 0),
            ("seq_lens", (r,), torch.int32, 1),
            ("query_start", (r + 1,), torch.int32, None),
            ("segs", (3, self.num_segments_max), torch.int32, 0),  # seg slots, starts, lens
        ]
        # Every buffer is a view of one byte buffer (host and device alike), so tensor-parallel workers get
        # a whole step with one broadcast of `packed` (engine/parallel/). Spans start 8-byte aligned.
        spans, size = [], 0
        for _, shape, dtype, _ in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            spans.append((size, nbytes))
            size += -(-nbytes // 8) * 8
        host_bytes = torch.zeros(size, dtype=torch.uint8, pin_memory=pin)
        views: dict[str, np.ndarray] = {}
        for (name, shape, dtype, fill), (offset, nbytes) in zip(specs, spans, strict=True):
            host = host_bytes[offset : offset + nbytes].view(dtype).view(shape)
            # fill None: 0, 1, 2, ... The start contents are a valid all-padding step (one token per
            # row, no KV write, no adapter): what graph captures at start run on.
            if fill is None:
                host.copy_(torch.arange(shape[0], dtype=dtype))
            else:
                host.fill_(fill)
            views[name] = host.numpy()  # numpy views: element writes are far cheaper than on tensors
        self.packed = host_bytes.to(device)  # [bytes] uint8, the start contents too (on the CPU: itself)
        self._pairs: dict[str, tuple[Tensor, Tensor]] = {}
        for (name, shape, dtype, _), (offset, nbytes) in zip(specs, spans, strict=True):
            host, dev = (
                buf[offset : offset + nbytes].view(dtype).view(shape) for buf in (host_bytes, self.packed)
            )
            self._pairs[name] = (host, dev)
        self.ids = views["ids"]
        self.pos = views["pos"]
        self.slot_mapping = views["slot_mapping"]
        self.token_slots = views["token_slots"]
        self.sorted = views["sorted"]
        self.logit_idx = views["logit_idx"]
        self.tables = views["tables"]
        self.seq_lens = views["seq_lens"]
        self.query_start = views["query_start"]
        self.segs = views["segs"]
        self.segs[0].fill(-1)  # no segment in use
        self._pairs["segs"][1][0].fill_(-1)
        self._host_bytes, self._start = host_bytes, host_bytes.clone()  # the start contents (`reset`)
        self._copied: Any = None  # CUDA event of the last host -> device copy
        self.num_segments = 0

    def reset(self) -> None:
        """Back to the start contents (a valid all-padding step), on the host and the device."""
        if self._copied is not None:
            self._copied.synchronize()
        self._host_bytes.copy_(self._start)
        self.packed.copy_(self._start, non_blocking=False)
        self.num_segments = 0

    def device_buffer(self, name: str) -> Tensor:
        return self._pairs[name][1]

    # ---- the builder ----
    def fill(
        self,
        batch: Batch,
        input_ids: Tensor | None = None,
        all_logits: bool = False,
        pad_to: tuple[int, int, int] | None = None,
    ) -> Layout:
        """Write, check, group and upload one step. input_ids [B] on the device: a decode step ahead of
        the host (async scheduling), each row computing position num_computed_tokens == num_tokens with
        that id. pad_to (tokens, sequences, query_len) is a graph bucket: query_len > 0 the uniform
        layout, 0 ragged (module docstring). Raises ValueError before anything reaches the device."""
        bs, ahead = self.block_size, input_ids is not None
        size = len(batch)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies read these host buffers
        ids, pos, slots, lora = self.ids, self.pos, self.slot_mapping, self.token_slots
        tables, seq_lens, starts, last = self.tables, self.seq_lens, self.query_start, self.logit_idx
        num_slots = self.num_slots
        if size > self.max_rows:
            raise ValueError(f"{size} sequences: more than the step input holds ({self.max_rows})")
        t = width = 0
        for i, (req, n) in enumerate(batch):
            p, table = req.num_computed_tokens, req.block_table
            end = p + n
            if n <= 0 or (p != req.num_tokens if ahead else end > req.num_tokens):
                raise ValueError(f"request {req.request_id}: cannot compute tokens [{p}, {end})")
            if len(table) * bs < end:
                raise ValueError(f"request {req.request_id}: {len(table)} blocks for {end} tokens")
            if not -1 <= req.lora_slot < num_slots:
                raise ValueError(f"request {req.request_id}: lora slot {req.lora_slot} out of range")
            if len(table) > width:
                width = len(table)
                if width > self.max_blocks:
                    raise ValueError(f"request {req.request_id}: {width} blocks, more than a table row")
            tables[i, : len(table)] = table
            if n == 1:  # decode: scalar writes, no array temporaries
                ids[t] = 0 if ahead else req.all_token_ids[p]  # ahead: 0 holds the device token's place
                pos[t] = p
                slots[t] = table[p // bs] * bs + p % bs
                lora[t] = req.lora_slot
            else:
                if t + n > self.max_tokens:  # decode rows fit: max_tokens >= max_rows
                    raise ValueError(f"step over {self.max_tokens} tokens, more than the step input holds")
                positions = np.arange(p, end)
                ids[t : t + n] = req.all_token_ids[p:end]
                pos[t : t + n] = positions
                slots[t : t + n] = tables[i, positions // bs].astype(np.int64) * bs + positions % bs
                lora[t : t + n] = req.lora_slot
            seq_lens[i], starts[i] = end, t
            if not all_logits:
                last[i] = t + n - 1
            t += n
        starts[size] = t
        if ids[:t].min() < 0 or ids[:t].max() >= self.vocab_size:
            # On CUDA an out-of-range embedding index is a device-side assert that kills the whole engine.
            raise ValueError(f"token ids outside [0, {self.vocab_size})")
        # Columns past a row's length hold ids written (and checked) by earlier steps: checking the
        # whole [B, width] block is a sound, vectorised version of a per-row check.
        used = tables[:size, :width]
        if used.min() < 0 or used.max() >= self.num_kv_blocks:
            tables[:size].fill(0)  # never leave a bad id behind for a later step's check to trip on
            # A wrong block id would read or overwrite another sequence's (another tenant's) KV.
            raise ValueError(f"block ids outside [0, {self.num_kv_blocks})")
        layout = self._pad(size, t, width, all_logits, pad_to)
        self.num_segments = self._group(layout.tokens) if (lora[: layout.tokens] >= 0).any() else 0
        self._upload(layout)
        if input_ids is not None:
            self.device_buffer("ids")[:size].copy_(input_ids, non_blocking=True)
        return dataclasses.replace(layout, num_segments=self.num_segments)

    def _pad(
        self, size: int, t: int, width: int, all_logits: bool, pad_to: tuple[int, int, int] | None
    ) -> Layout:
        """Fill the bucket past the real rows; returns the layout (num_segments filled in later)."""
        if pad_to is None:  # eager: exactly the step, the table cut to its widest row
            return Layout(t, size, width, t if all_logits else size, not all_logits and t != size, 0)
        tokens, seqs, q = pad_to
        bs = self.block_size
        ids, pos, slots, lora = self.ids, self.pos, self.slot_mapping, self.token_slots
        tables, seq_lens, starts, last = self.tables, self.seq_lens, self.query_start, self.logit_idx
        pad = tokens - t
        ids[t:tokens], slots[t:tokens], lora[t:tokens] = 0, -1, -1  # no KV write, no adapter
        if q:  # uniform: each padding row q tokens at positions 0..q-1, context in block 0
            pos[t:tokens] = np.arange(pad) % q
            tables[size:seqs, : -(-q // bs)], seq_lens[size:seqs] = 0, q
            starts[size : seqs + 1] = t + q * np.arange(seqs - size + 1)
            return Layout(tokens, seqs, self.max_blocks, tokens, False, 0)
        # ragged: empty rows, then the padding sequence owning every padding token
        pos[t:tokens] = np.arange(pad)
        starts[size : seqs + 1], seq_lens[size:seqs], last[size:seqs] = t, 0, 0
        tables[seqs, : -(-tokens // bs)], seq_lens[seqs], starts[seqs + 1] = 0, pad, tokens
        return Layout(tokens, seqs + 1, self.max_blocks, seqs, True, 0)

    def _group(self, tokens: int) -> int:
        """make_lora_meta's grouping of the step's tokens, on the host; returns the segments in use."""
        count = self.num_segments_max
        token_slots = self.token_slots[:tokens]
        keys = np.where(token_slots < 0, count, token_slots)  # no adapter sorts last
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=count + 1)[:count]
        present = np.flatnonzero(counts)
        seg_starts = np.cumsum(counts) - counts
        segs = self.segs
        segs[0].fill(-1)
        segs[1:].fill(0)
        k = len(present)
        segs[0, :k], segs[1, :k], segs[2, :k] = present, seg_starts[present], counts[present]
        self.sorted[:tokens] = order
        return k

    def _upload(self, layout: Layout) -> None:
        tokens, rows = layout.tokens, layout.rows
        sizes = {"ids": tokens, "pos": tokens, "slot_mapping": tokens, "token_slots": tokens,
                 "sorted": tokens, "tables": rows, "seq_lens": rows, "query_start": rows + 1,
                 "logit_idx": layout.num_logits if layout.gather else 0}  # fmt: skip
        if self.device.type != "cuda":
            return  # on the CPU each pair is one tensor (`host.to(device)` returns it): nothing to copy
        for name, n in sizes.items():
            if n:
                host, dev = self._pairs[name]
                dev[:n].copy_(host[:n], non_blocking=True)
        if self.num_segments:
            host, dev = self._pairs["segs"]
            dev.copy_(host, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    # ---- what a forward reads ----
    def attention(self, layout: Layout) -> AttentionBatch:
        d = self.device_buffer
        return AttentionBatch(
            slot_mapping=d("slot_mapping")[: layout.tokens],  # [T]
            block_tables=d("tables")[: layout.rows, : layout.width],  # [B, width]
            seq_lens=d("seq_lens")[: layout.rows],  # [B]
            query_start_loc=d("query_start")[: layout.rows + 1],  # [B+1]
        )

    def lora_meta(self, layout: Layout) -> LoRAMeta:
        d = self.device_buffer
        segs = d("segs")
        return LoRAMeta(
            token_slots=d("token_slots")[: layout.tokens],
            sorted_token_ids=d("sorted")[: layout.tokens],
            seg_slots=segs[0],
            seg_starts=segs[1],
            seg_lens=segs[2],
            num_segments=layout.num_segments,
        )

    def logit_rows(self, layout: Layout) -> Tensor | None:
        """[num_logits] int64 token rows whose logits the step returns; None: every token's."""
        return self.device_buffer("logit_idx")[: layout.num_logits] if layout.gather else None
