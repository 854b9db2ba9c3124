"""Block pool, prefix-cache chain hashing and LRU eviction, on exact block ids."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, hash_block
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams

BS = 4


def make(rid: str, tokens: list[int], salt: str | None = None, adapter: str | None = None) -> Request:
    lora = LoRARequest("x", content_hash=adapter) if adapter else None
    return Request(rid, list(tokens), SamplingParams(), cache_salt=salt, lora=lora)


def admit(bm: BlockManager, req: Request) -> int:
    """What the scheduler does on admission: take the hits, then allocate the rest of the prompt; then
    the model computes it."""
    hits, cached = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, req.num_tokens - cached, hits)
    bm.record_lookup(req.num_tokens, cached)
    req.num_computed_tokens = req.num_tokens
    return cached


def test_allocation_takes_lowest_free_ids_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make("a", list(range(10)))  # 3 blocks
    assert admit(bm, a) == 0
    assert a.block_table == [0, 1, 2]
    b = make("b", list(range(5)))  # 2 blocks
    admit(bm, b)
    assert b.block_table == [3, 4]
    assert bm.num_free_blocks == 3
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 6
    assert all(bm.blocks[i].ref_count == 0 for i in (0, 1, 2))


def test_allocate_fails_without_side_effects_when_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make("a", list(range(9)))  # needs 3 blocks
    admit(bm, a)
    b = make("b", [100, 101])
    before = bm.num_free_blocks
    assert not bm.allocate_slots(b, 2)
    assert b.block_table == [] and bm.num_free_blocks == before == 0


def test_decode_grows_the_table_only_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=BS)
    r = make("r", [1, 2, 3])
    admit(bm, r)
    r.num_computed_tokens = 3
    r.append_token(4)
    assert bm.allocate_slots(r, 1)
    assert r.block_table == [0]
    r.num_computed_tokens = 4
    r.append_token(5)
    assert bm.allocate_slots(r, 1)
    assert r.block_table == [0, 1]


def test_prefix_hit_reuses_exact_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(12))  # exactly 3 full blocks
    a = make("a", prompt, salt="t1")
    admit(bm, a)
    assert a.block_table == [0, 1, 2]
    b = make("b", [*prompt, 99], salt="t1")
    assert admit(bm, b) == 12
    assert b.block_table[:3] == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [2, 2, 2]
    # Same tokens exactly: the last block cannot be a hit, its last token's logits are needed.
    c = make("c", prompt, salt="t1")
    assert admit(bm, c) == 8
    assert c.block_table[:2] == [0, 1] and c.block_table[2] not in (0, 1, 2)


def test_partial_block_is_never_shared():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make("a", [1, 2, 3, 4, 5, 6])
    admit(bm, a)
    b = make("b", [1, 2, 3, 4, 5, 6, 7])
    assert admit(bm, b) == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_salt_isolates_tenants_with_positive_control():
    bm = BlockManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    admit(bm, make("a", prompt, salt="tenant-1"))
    assert admit(bm, make("same", prompt, salt="tenant-1")) == 8
    assert admit(bm, make("other", prompt, salt="tenant-2")) == 0
    assert admit(bm, make("nosalt", prompt, salt=None)) == 0
    assert admit(bm, make("empty", prompt, salt="")) == 0


def test_adapter_content_hash_keys_every_block():
    bm = BlockManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    admit(bm, make("a", prompt, salt="t", adapter="aa" * 32))
    assert admit(bm, make("same", prompt, salt="t", adapter="aa" * 32)) == 8
    assert admit(bm, make("base", prompt, salt="t")) == 0
    assert admit(bm, make("other", prompt, salt="t", adapter="bb" * 32)) == 0


def test_adapter_name_is_not_part_of_the_key():
    bm = BlockManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    a = make("a", prompt, adapter="cc" * 32)
    admit(bm, a)
    renamed = Request("b", prompt, SamplingParams(), lora=LoRARequest("renamed", content_hash="cc" * 32))
    assert admit(bm, renamed) == 8
    # Same name, other weights: no hit.
    same_name = Request("c", prompt, SamplingParams(), lora=LoRARequest("x", content_hash="dd" * 32))
    assert admit(bm, same_name) == 0


def test_hash_hit_is_confirmed_against_stored_tokens():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make("a", list(range(9)))
    admit(bm, a)
    # Simulate a sha256 collision: another request's first block hashes to a's cached block.
    b = make("b", [50, 51, 52, 53, 54, 55, 56, 57, 58])
    bm.update_block_hashes(b)
    b.block_hashes[0] = a.block_hashes[0]
    assert admit(bm, b) == 0
    assert a.block_table[0] not in b.block_table


def test_hash_chain_depends_on_parent_tokens_and_every_extra_key():
    base = hash_block(None, (1, 2), ("s", None))
    assert hash_block(None, (1, 2), ("s", None)) == base
    assert hash_block(b"\x01" * 32, (1, 2), ("s", None)) != base
    assert hash_block(None, (1, 3), ("s", None)) != base
    assert hash_block(None, (1, 2), (None, None)) != base
    assert hash_block(None, (1, 2), ("", None)) != hash_block(None, (1, 2), (None, None))
    assert hash_block(None, (1, 2), ("s", "a")) != base
    # Field boundaries cannot be shifted to forge another key.
    assert hash_block(None, (1,), ("ab", None)) != hash_block(None, (1,), ("a", "b"))
    assert len(base) == 32


def test_freed_cached_blocks_stay_reusable_then_evict_lru_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make("a", [*range(8), 100])  # blocks 0,1 full + 2 partial
    b = make("b", [*range(20, 28), 200])  # blocks 3,4 full + 5 partial
    admit(bm, a)
    admit(bm, b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    bm.free(a)  # 0, 1 cached (freed tail first: 1 then 0), 2 plain
    bm.free(b)  # 4 then 3 cached, 5 plain
    assert bm.num_free_blocks == 6
    # A fresh request uses plain blocks first, then evicts the least recently freed cached block.
    c = make("c", list(range(40, 52)))  # 3 blocks
    admit(bm, c)
    assert c.block_table == [2, 5, 1]
    # a's second block is gone, its first block still hits.
    again = make("a2", [*range(8), 100])
    assert admit(bm, again) == 4
    # Its two new blocks evict b's cached blocks in the order they were freed: tail (4) first.
    assert again.block_table == [0, 4, 3]
    assert bm.get_computed_blocks(make("b2", [*range(20, 28), 200])) == ([], 0)


def test_a_hit_on_a_freed_cached_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make("a", [*range(8), 1])
    admit(bm, a)
    bm.free(a)
    b = make("b", [*range(8), 2])
    assert admit(bm, b) == 8
    assert b.block_table[:2] == [0, 1]
    assert bm.num_free_blocks == 0
    # Pool exhausted: a third request cannot steal the blocks b holds.
    assert not bm.allocate_slots(make("c", [7]), 1)


def test_can_allocate_counts_hits_sitting_in_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make("a", [*range(8), 1])
    admit(bm, a)
    bm.free(a)  # all three free, two of them cached
    b = make("b", [*range(8), *range(50, 54)])  # 2 hit blocks + needs 2 more (12 tokens -> 3 blocks)
    hits, cached = bm.get_computed_blocks(b)
    assert (hits, cached) == ([0, 1], 8)
    assert bm.allocate_slots(b, b.num_tokens - cached, hits)
    assert b.block_table == [0, 1, 2]
    d = make("d", [*range(8), *range(60, 66)])  # would need 2 fresh blocks; none left
    hits, cached = bm.get_computed_blocks(d)
    assert not bm.allocate_slots(d, d.num_tokens - cached, hits)


def test_blocks_are_registered_as_they_fill_during_decode():
    bm = BlockManager(num_blocks=6, block_size=BS)
    r = make("r", [1, 2, 3], salt="s")
    admit(bm, r)
    r.num_computed_tokens = 3
    r.append_token(4)
    assert bm.allocate_slots(r, 1)  # token 4 fills block 0 this step
    assert bm.blocks[0].block_hash == r.block_hashes[0]
    other = make("o", [1, 2, 3, 4, 9], salt="s")
    assert bm.get_computed_blocks(other) == ([0], 4)


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=BS)
    r = make("r", [1])
    admit(bm, r)
    table = list(r.block_table)
    bm.free(r)
    r.block_table = table
    with pytest.raises(AssertionError):
        bm.free(r)


def test_prefix_caching_off_never_hits_and_stats_count_hits():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    admit(bm, make("a", list(range(9))))
    assert admit(bm, make("b", list(range(9)))) == 0
    on = BlockManager(num_blocks=10, block_size=BS)
    admit(on, make("a", list(range(9))))
    admit(on, make("b", list(range(9))))
    assert on.stats.queried_tokens == 18 and on.stats.hit_tokens == 8
    assert on.stats.hit_rate == pytest.approx(8 / 18)


def test_reset_prefix_cache_drops_only_unheld_blocks():
    bm = BlockManager(num_blocks=6, block_size=BS)
    held = make("held", [*range(4), 9])
    admit(bm, held)
    gone = make("gone", [*range(10, 14), 9])
    admit(bm, gone)
    bm.free(gone)
    bm.reset_prefix_cache()
    assert admit(bm, make("x", [*range(10, 14), 8])) == 0
    assert admit(bm, make("y", [*range(4), 8])) == 4


def test_blocks_freed_before_their_kv_was_computed_leave_the_prefix_cache():
    bm = BlockManager(num_blocks=6, block_size=BS)
    r = make("r", [*range(8), 9])
    hits, _ = bm.get_computed_blocks(r)
    assert bm.allocate_slots(r, r.num_tokens, hits)  # scheduled: blocks 0 and 1 registered for this step
    assert bm.get_computed_blocks(make("probe", [*range(8), 5])) == ([0, 1], 8)
    bm.free(r)  # preempted in that same step: the KV of blocks 0 and 1 will never be written
    assert bm.get_computed_blocks(make("probe", [*range(8), 5])) == ([], 0)
    assert all(b.block_hash is None for b in bm.blocks)


def _state(bm: BlockManager, reqs: list[Request]) -> tuple:
    blocks = [(b.ref_count, b.block_hash, b.parent_hash, b.token_ids, b.extra_keys) for b in bm.blocks]
    per_request = [(r.block_table, r.num_registered_blocks, r.num_computed_tokens) for r in reqs]
    return blocks, per_request, list(bm._free_plain), list(bm._free_cached), dict(bm._cached)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_decode_shortcut_of_allocate_slots_agrees_with_the_general_path(seed, prefix_caching):
    """Two pools driven alike, one through allocate_slots (with its shortcut for blocks that still have
    room), one through the general path only: same blocks, registrations, free lists and cache, always."""
    import random

    rng = random.Random(seed)
    pools = [BlockManager(24, BS, prefix_caching), BlockManager(24, BS, prefix_caching)]
    pools[1].allocate_slots = pools[1]._allocate  # type: ignore[method-assign]
    shared = [rng.randrange(100) for _ in range(7)]
    twins: list[list[Request]] = [[], []]
    for i in range(10):
        prompt = (shared[: rng.randrange(8)] if rng.random() < 0.6 else []) + [
            rng.randrange(100) for _ in range(rng.randrange(1, 9))
        ]
        salt = rng.choice(["s", "t", None])
        for side in (0, 1):
            twins[side].append(make(f"r{i}", prompt, salt=salt))
    running: set[int] = set()
    for _ in range(400):
        i = rng.randrange(10)
        op = rng.random()
        tokens = rng.randrange(100)
        results = []
        for bm, reqs in zip(pools, twins, strict=True):
            r = reqs[i]
            if i not in running:
                hits, cached = bm.get_computed_blocks(r)
                ok = bm.allocate_slots(r, r.num_tokens - cached, hits)
                if ok:
                    r.num_computed_tokens = r.num_tokens
            elif op < 0.08:
                bm.free(r)
                r.num_computed_tokens = 0
                ok = False  # finished or preempted: waits to be admitted again
            else:
                r.append_token(tokens)
                ok = bm.allocate_slots(r, 1)
                if ok:
                    r.num_computed_tokens += 1
                else:
                    bm.free(r)
                    r.num_computed_tokens = 0
            results.append(ok)
        assert results[0] == results[1]
        running.add(i) if results[0] else running.discard(i)
        assert _state(pools[0], twins[0]) == _state(pools[1], twins[1])
        for a, b in zip(twins[0], twins[1], strict=True):
            known = min(len(a.block_hashes), len(b.block_hashes))  # computed lazily: may differ in length
            assert a.block_hashes[:known] == b.block_hashes[:known]
    assert any(r.num_registered_blocks for r in twins[0]) == prefix_caching
