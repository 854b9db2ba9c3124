"""Megatron / S-LoRA sharding (engine/parallel/sharding.py) on plain tensors: every rank's parts put
back together are the whole model's math, for split and for replicated KV heads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.lora import LoRAAdapter, module_shapes
from engine.lora_slots import LoRASlots
from engine.model_config import ModelConfig
from engine.ops import COLUMN_GROUPS, MODULE_GROUPS, LoRABatch, get_ops
from engine.parallel.protocol import header, pack_adapter, unpack_adapter
from engine.parallel.sharding import Shard, check_shardable, lora_rows

CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=64,
)  # fmt: skip


def test_heads_and_replicated_kv_heads():
    assert [Shard(CFG, r, 2).heads for r in range(2)] == [(0, 2), (2, 4)]
    assert [Shard(CFG, r, 2).kv_heads for r in range(2)] == [(0, 1), (1, 2)]
    # 4 ranks, 2 KV heads: each KV head on the two ranks whose query heads read it (q head h -> h // 2).
    assert [Shard(CFG, r, 4).kv_heads for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    local = Shard(CFG, 1, 4).local_config()
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (1, 1, 6, 37)


def test_unshardable_models_are_refused_by_name():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*4 attention heads"):
        check_shardable(CFG, 3)
    with pytest.raises(ValueError, match=r"KV heads"):
        check_shardable(dataclasses.replace(CFG, num_heads=12, num_kv_heads=3, intermediate_size=24), 2)
    check_shardable(CFG, 4)


@pytest.mark.parametrize("size", [2, 4])
def test_attention_and_mlp_shards_compute_the_whole_layer(size):
    """Column-parallel q/k/v (per part of a fused qkv_proj) and gate/up; row-parallel o and down whose
    partial outputs sum (bias once); GQA heads read their own KV head on every rank."""
    torch.manual_seed(0)
    cfg, d = CFG, CFG.head_dim
    x = torch.randn(3, cfg.hidden_size)
    qkv = torch.randn(cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    o_w, o_b = torch.randn(cfg.hidden_size, cfg.q_size), torch.randn(cfg.hidden_size)
    q, k, v = (x @ qkv.T).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    group = cfg.num_heads // cfg.num_kv_heads
    # Toy "attention" per head: q * (its KV head's k + v), enough to check which KV head each q head reads.
    heads = [
        q[:, h * d : (h + 1) * d] * (k + v)[:, (h // group) * d : (h // group + 1) * d]
        for h in range(cfg.num_heads)
    ]
    whole = torch.cat(heads, dim=-1) @ o_w.T + o_b
    total = torch.zeros_like(whole)
    for rank in range(size):
        shard = Shard(cfg, rank, size)
        local = shard.local_config()
        lq, lk, lv = (x @ shard.weight("model.layers.0.self_attn.qkv_proj.weight", qkv).T).split(
            [local.q_size, local.kv_size, local.kv_size], dim=-1
        )
        lgroup = local.num_heads // local.num_kv_heads
        lheads = [lq[:, h * d : (h + 1) * d] * (lk + lv)[:, (h // lgroup) * d : (h // lgroup + 1) * d] for h in range(local.num_heads)]  # fmt: skip
        w = shard.weight("model.layers.0.self_attn.o_proj.weight", o_w)
        b = shard.weight("model.layers.0.self_attn.o_proj.bias", o_b)
        total += torch.cat(lheads, dim=-1) @ w.T + b
    torch.testing.assert_close(total, whole)
    gate_up = torch.randn(2 * cfg.intermediate_size, cfg.hidden_size)
    down = torch.randn(cfg.hidden_size, cfg.intermediate_size)
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    mlp = (torch.nn.functional.silu(g) * u) @ down.T
    parts = torch.zeros_like(mlp)
    for rank in range(size):
        shard = Shard(cfg, rank, size)
        lg, lu = (x @ shard.weight("model.layers.0.mlp.gate_up_proj.weight", gate_up).T).chunk(2, dim=-1)
        parts += (torch.nn.functional.silu(lg) * lu) @ shard.weight(
            "model.layers.0.mlp.down_proj.weight", down
        ).T
    torch.testing.assert_close(parts, mlp)


def test_vocab_rows_are_padded_and_cover_the_vocabulary():
    table = torch.randn(CFG.vocab_size, CFG.hidden_size)
    parts = [Shard(CFG, r, 2).weight("model.embed_tokens.weight", table) for r in range(2)]
    assert parts[0].shape == parts[1].shape == (19, CFG.hidden_size)
    torch.testing.assert_close(torch.cat(parts)[: CFG.vocab_size], table)
    assert (parts[1][-1] == 0).all()  # the padding row


def _adapter(seed: int) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for module, (d_in, d_out) in module_shapes(CFG).items():
        r = 3 if module != "down_proj" else 2
        a[module] = torch.randn(CFG.num_layers, r, d_in, generator=gen)
        b[module] = torch.randn(CFG.num_layers, d_out, r, generator=gen)
    ranks = torch.tensor([[3, 3, 3, 2]] * CFG.num_layers, dtype=torch.int32)
    return LoRAAdapter("h", 3, 0.5, a, b, ranks)


@pytest.mark.parametrize("size", [2, 4])
def test_lora_shards_sum_to_the_whole_delta(size):
    """Column-parallel modules: the ranks' output columns concatenated; row-parallel: each rank's
    partial delta (its A columns, the whole B) summed, as the base all-reduce sums them."""
    adapter = _adapter(1)
    shapes = module_shapes(CFG)
    shards = [Shard(CFG, r, size) for r in range(size)]
    parts = [s.adapter(adapter) for s in shards]
    for module, (d_in, _) in shapes.items():
        a, b = adapter.a[module][0], adapter.b[module][0]
        x = torch.randn(5, d_in)
        whole = x @ a.T @ b.T
        if module in ("o_proj", "down_proj"):
            cols = [s.heads if module == "o_proj" else s.inter for s in shards]
            scale = CFG.head_dim if module == "o_proj" else 1
            got = sum(
                x[:, lo * scale : hi * scale] @ p.a[module][0].T @ p.b[module][0].T
                for p, (lo, hi) in zip(parts, cols, strict=True)
            )
            torch.testing.assert_close(got, whole)
        else:
            got_cols = [x @ p.a[module][0].T @ p.b[module][0].T for p in parts]
            if module in ("k_proj", "v_proj") and size > CFG.num_kv_heads:  # replicated KV heads
                got_cols = got_cols[:: size // CFG.num_kv_heads]
            torch.testing.assert_close(torch.cat(got_cols, dim=-1), whole)


def test_adapter_bytes_round_trip():
    adapter = _adapter(2)
    del adapter.a["k_proj"], adapter.b["k_proj"]  # a module it does not target
    head = header(4)
    flat = pack_adapter(2, adapter, head)
    back = unpack_adapter(head, flat, CFG, torch.float32)
    assert int(head[1]) == 2 and back.scaling == 0.5 and set(back.a) == set(adapter.a)
    for m in adapter.a:
        assert torch.equal(back.a[m], adapter.a[m]) and torch.equal(back.b[m], adapter.b[m])
    assert torch.equal(back.ranks, adapter.ranks) and back.ranks.shape == (CFG.num_layers, len(MODULE_GROUPS))


def _ranked(seed: int, r: int, targets: tuple[str, ...]) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(CFG)
    a = {m: torch.randn(CFG.num_layers, r, shapes[m][0], generator=gen) for m in targets}
    b = {m: torch.randn(CFG.num_layers, shapes[m][1], r, generator=gen) for m in targets}
    groups = [r if any(m in targets for m in g) else 0 for g in MODULE_GROUPS]
    return LoRAAdapter(f"r{r}", r, 0.5, a, b, torch.tensor([groups] * CFG.num_layers, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("size", [2, 4])
def test_fully_sharded_shrink_gathers_to_the_whole_delta(size, backend):
    """fully_sharded_loras: each rank's slots hold its rows of the column-parallel A (max_lora_rank 5
    padded to a multiple of the ranks); its shrink, all-gathered in rank order and expanded with its B
    rows, is its columns of the whole delta, for a rank-5 adapter, a rank-3 one (some ranks hold none of
    its rows) with other targets, and base tokens. Through LoRABatch.apply: a first pass collects every
    rank's shrink (the all-gather's inputs), the second hands each rank their concatenation."""
    max_rank, layer = 5, 1
    rows = lora_rows(max_rank, size, True)
    assert rows * size >= max_rank and lora_rows(max_rank, 1, True) == lora_rows(max_rank, size, False) == 0
    adapters = [
        _ranked(5, 5, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")),
        _ranked(6, 3, ("q_proj", "v_proj", "up_proj", "o_proj")),
    ]
    ops = get_ops(backend, torch.device("cpu"))
    token_slots = torch.tensor([0, 0, 1, -1, 1, 0, -1], dtype=torch.int32)
    meta = ops.make_lora_meta(token_slots, len(adapters))
    shards = [Shard(CFG, k, size, rows) for k in range(size)]
    slots = []
    for shard in shards:
        slot_rank, split = shard.lora_slot_args(max_rank)
        s = LoRASlots(
            shard.local_config(), len(adapters), slot_rank, torch.float32, torch.device("cpu"), a_split=split
        )
        for i, adapter in enumerate(adapters):
            s.write(i, shard.adapter(adapter))
        assert s.a["q_proj"].shape[2] == rows and s.b["q_proj"].shape[3] == rows * size
        assert s.a["o_proj"].shape[2] == rows * size  # row-parallel A: split by columns, all its rows
        slots.append(s)
    active = [[True] * len(MODULE_GROUPS) for _ in range(CFG.num_layers)]
    shapes = module_shapes(CFG)
    torch.manual_seed(0)
    for group in COLUMN_GROUPS:
        modules = MODULE_GROUPS[group]
        x = torch.randn(len(token_slots), shapes[modules[0]][0])
        shrinks: list[torch.Tensor] = []

        def collect(t: torch.Tensor, shrinks: list[torch.Tensor] = shrinks) -> torch.Tensor:
            shrinks.append(t.clone())
            return t.new_zeros(*t.shape[:-1], t.shape[-1] * size)

        outs = []
        for phase in ("collect", "gathered"):
            outs = []
            for k, s in enumerate(slots):

                def gathered(
                    t: torch.Tensor, k: int = k, shrinks: list[torch.Tensor] = shrinks
                ) -> torch.Tensor:
                    assert torch.equal(t, shrinks[k])
                    return torch.cat(shrinks, dim=-1)

                batch = LoRABatch(
                    meta, s.a, s.b, s.scales, s.ranks, ops, active, None, s.shrink_ranks,
                    collect if phase == "collect" else gathered,
                )  # fmt: skip
                y = torch.zeros(len(token_slots), sum(s.b[m].shape[2] for m in modules))
                batch.apply(layer, group, x, y)
                outs.append(y.split([s.b[m].shape[2] for m in modules], dim=-1))
        for n, module in enumerate(modules):
            whole = torch.zeros(len(token_slots), shapes[module][1])
            for t, slot in enumerate(token_slots.tolist()):
                if slot >= 0 and module in adapters[slot].a:
                    ad = adapters[slot]
                    whole[t] = ad.scaling * (x[t] @ ad.a[module][layer].T @ ad.b[module][layer].T)
            cols = [out[n] for out in outs]
            if module in ("k_proj", "v_proj") and size > CFG.num_kv_heads:  # replicated KV heads
                cols = cols[:: size // CFG.num_kv_heads]
            torch.testing.assert_close(torch.cat(cols, dim=-1), whole)


def test_all_gather_last_dim_puts_the_ranks_slices_in_rank_order():
    """TPGroup.all_gather_last_dim over two gloo ranks (threads): [M, T, n] parts -> [M, T, 2n], rank 0's
    columns first, on every rank."""
    import threading

    from engine.parallel.group import TPGroup, make_store

    first = make_store(0, 2, 0, 30.0)
    stores = [first, make_store(1, 2, first.port, 30.0)]
    parts = [torch.arange(12.0).reshape(2, 3, 2) + 100 * k for k in range(2)]
    got: list[torch.Tensor | None] = [None, None]

    def run(k: int) -> None:
        group = TPGroup(stores[k], k, 2, torch.device("cpu"), 30.0)
        got[k] = group.all_gather_last_dim(parts[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    want = torch.cat(parts, dim=-1)
    assert got[0] is not None and got[1] is not None
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
