"""Paged KV block pool with reference counts and a per-tenant, per-adapter prefix cache. No torch.

A block id is an index into the model runner's KV cache tensors. Full blocks are named by a chain hash
sha256(parent hash, block tokens, extra keys): the first block's extra keys hold the cache salt (the
server derives it from the tenant), every block's hold the adapter's content hash, so a cached prefix is
only ever reused by the same tenant on the same adapter weights. A hash hit is also checked against the
tokens stored with the block, so even a hash collision cannot hand one tenant another's KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from engine.request import Request

_NONE = b"\x00"  # distinguishes "no salt / base model" from an empty string


def _key_bytes(value: str | None) -> bytes:
    if value is None:
        return _NONE
    raw = value.encode("utf-8")
    return b"\x01" + struct.pack("<Q", len(raw)) + raw


def hash_block(parent: bytes | None, tokens: tuple[int, ...], extra: tuple[str | None, ...]) -> bytes:
    """Chain hash of one full block; every field is length-prefixed so no two inputs share an encoding."""
    digest = hashlib.sha256()
    digest.update(parent if parent is not None else b"\x00" * 32)
    digest.update(struct.pack("<Q", len(tokens)))
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    digest.update(struct.pack("<Q", len(extra)))
    for key in extra:
        digest.update(_key_bytes(key))
    return digest.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    # Set only while the block is registered in the prefix cache.
    block_hash: bytes | None = None
    parent_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()
    extra_keys: tuple[str | None, ...] = ()


@dataclass(slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks come in two pools: plain ones (nothing worth keeping) are used first; cached ones
        # keep their KV until needed, and are then evicted least recently freed first.
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}
        self.stats = PrefixCacheStats()

    # ---- pool state ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing ----
    def _extra_keys(self, request: Request, block_index: int) -> tuple[str | None, ...]:
        if block_index == 0:
            return (request.cache_salt, request.adapter_hash)
        return (request.adapter_hash,)

    def _block_tokens(self, request: Request, block_index: int) -> tuple[int, ...]:
        start = block_index * self.block_size
        return tuple(request.all_token_ids[start : start + self.block_size])

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes over every full block of its tokens (prompt and output)."""
        full = request.num_tokens // self.block_size
        for i in range(len(request.block_hashes), full):
            parent = request.block_hashes[i - 1] if i > 0 else None
            request.block_hashes.append(
                hash_block(parent, self._block_tokens(request, i), self._extra_keys(request, i))
            )

    def _matches(self, block: Block, request: Request, index: int) -> bool:
        parent = request.block_hashes[index - 1] if index > 0 else None
        return (
            block.parent_hash == parent
            and block.token_ids == self._block_tokens(request, index)
            and block.extra_keys == self._extra_keys(request, index)
        )

    # ---- prefix cache ----
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks that can stand in for the start of this request, and how many tokens they cover.
        At least one token is always left to compute: the step needs its logits."""
        if not self.enable_prefix_caching or request.skips_prefix_cache:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block_id = self._cached.get(block_hash)
            if block_id is None or not self._matches(self.blocks[block_id], request, i):
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def record_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Counted by the scheduler once per admission (a lookup may be repeated while a request waits)."""
        self.stats.queried_tokens += num_tokens
        self.stats.hit_tokens += num_cached

    def _register(self, request: Request, upto_tokens: int) -> None:
        """Enter this request's full blocks below upto_tokens into the prefix cache. Called when they are
        scheduled: their KV is written in the same forward pass, before any attention reads it."""
        if not self.enable_prefix_caching:
            return
        self.update_block_hashes(request)
        full = min(upto_tokens // self.block_size, len(request.block_hashes))
        start, request.num_registered_blocks = (
            request.num_registered_blocks,
            max(request.num_registered_blocks, full),
        )
        for i in range(start, full):  # each decode step offers at most one new block
            block = self.blocks[request.block_table[i]]
            if block.block_hash is not None:
                continue
            block_hash = request.block_hashes[i]
            if block_hash in self._cached:
                continue  # an identical block is already cached; this copy stays private
            block.block_hash = block_hash
            block.parent_hash = request.block_hashes[i - 1] if i > 0 else None
            block.token_ids = self._block_tokens(request, i)
            block.extra_keys = self._extra_keys(request, i)
            self._cached[block_hash] = block.block_id

    # ---- allocation ----
    def _take_free_block(self) -> Block:
        if self._free_plain:
            block = self.blocks[self._free_plain.popleft()]
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
        block.ref_count = 1
        return block

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = ()
        block.extra_keys = ()

    def can_allocate(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        total = len(request.block_table) + len(computed_blocks)
        upto = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        need = self.blocks_needed(upto) - total
        # Cached hits sitting in the free pool stop being free once this request holds them.
        reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - reclaimed

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Give the request blocks for tokens up to num_computed (+ cached hits) + num_new_tokens.
        computed_blocks: prefix-cache hits from get_computed_blocks (only when a request is admitted);
        they advance num_computed_tokens, and num_new_tokens count from there. Returns False, changing nothing, when the pool cannot cover it."""
        if not computed_blocks:
            upto = request.num_computed_tokens + num_new_tokens
            if upto <= len(request.block_table) * self.block_size:
                # Most decode steps: the last block has room. Only a block filling up has anything to
                # register (hashes of full blocks are computed lazily, so skipping that changes nothing).
                if self.enable_prefix_caching and upto // self.block_size > request.num_registered_blocks:
                    self._register(request, upto)
                return True
        return self._allocate(request, num_new_tokens, computed_blocks)

    def _allocate(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """allocate_slots without its shortcut (tests check that both agree)."""
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]
            block.ref_count += 1
            request.block_table.append(block_id)
        request.num_computed_tokens += len(computed_blocks) * self.block_size
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_table)
        for _ in range(need):
            request.block_table.append(self._take_free_block().block_id)
        self._register(request, request.num_computed_tokens + num_new_tokens)
        return True

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks. The tail is freed first so that, among one request's
        blocks, the end of the sequence is evicted before the shared-looking start. A block registered for
        tokens not computed yet (the request is preempted in the very step that scheduled them) leaves
        the prefix cache: its KV will never be written."""
        computed_blocks = request.num_computed_tokens // self.block_size
        for index in range(len(request.block_table) - 1, -1, -1):
            block = self.blocks[request.block_table[index]]
            block_id = block.block_id
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if index >= computed_blocks:
                    self._evict(block)
                if block.block_hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_plain.append(block_id)
        request.block_table = []
        request.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds (e.g. after an adapter is deleted)."""
        while self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(self.blocks[block_id])
            self._free_plain.append(block_id)
