"""The LoRA kernel warm-up at start (engine/kernel_warmup.py): it reaches every token block size the
launches pick, runs every module group, and writes nothing into the slots."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.demo import demo_config
from engine.kernel_warmup import WARM_SHAPES, warm_lora_kernels
from engine.lora_slots import LoRASlots
from engine.model_loader import parse_config
from engine.ops import MODULE_GROUPS, get_ops
from kernels.lora import LoRALaunch, _token_blocks


def test_the_shapes_reach_every_token_block_size() -> None:
    ops = get_ops("ref", torch.device("cpu"))
    picked = set()
    for tokens, adapters in WARM_SHAPES:
        slots = (torch.arange(tokens) * adapters // tokens).to(torch.int32)
        meta = ops.make_lora_meta(slots, 16)
        assert meta.num_segments == adapters
        block_m, _ = _token_blocks(tokens, meta, LoRALaunch())
        picked.add((block_m, "one" if tokens == 1 else "x16" if tokens % 16 == 0 else "other"))
    assert {b for b, _ in picked} == {4, 16, 32, 64}
    for block_m in (16, 32, 64):  # each size with a token count that is and one that is not a multiple of 16
        assert {(block_m, "x16"), (block_m, "other")} <= picked
    assert (4, "one") in picked


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_the_warmup_runs_every_group_and_leaves_the_slots_as_they_were(backend, monkeypatch) -> None:
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = parse_config(demo_config(64))
    slots = LoRASlots(cfg, 4, 8, torch.float32, torch.device("cpu"))
    before = {m: t.clone() for m, t in slots.a.items()}, {m: t.clone() for m, t in slots.b.items()}
    calls: list[int] = []
    ops = get_ops(backend, torch.device("cpu"))
    shrink = ops.lora_shrink

    def counted(x, weights_a, meta, out, ranks=None):
        calls.append(x.shape[0])
        shrink(x, weights_a, meta, out, ranks)

    ops = dataclasses.replace(ops, lora_shrink=counted)
    assert warm_lora_kernels(slots, ops, torch.device("cpu")) == 2 * len(WARM_SHAPES) * len(MODULE_GROUPS)
    assert sorted(set(calls)) == sorted({t for t, _ in WARM_SHAPES})
    assert all(torch.equal(slots.a[m], before[0][m]) for m in slots.a)
    assert all(torch.equal(slots.b[m], before[1][m]) for m in slots.b)
    assert (
        warm_lora_kernels(LoRASlots(cfg, 0, 8, torch.float32, torch.device("cpu")), ops, torch.device("cpu"))
        == 0
    )
