"""The decode-graph input path (fixed buffers, padding to buckets, host-built LoRA grouping) on the CPU.

Graphs themselves need CUDA; `runner.make_graphs(capture=False)` runs the same forward over the same
buffers (the runner's StepInput) eagerly, so these tests pin down everything a replay would read. The GPU run of benchmarks/serving.py
checks replay against eager on the device.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.cuda_graphs import DecodeGraphs, all_groups_mask, bucket_sizes
from engine.step_input import StepInput
from kernels.lora import make_lora_meta
from tests.helpers.hf_models import ALL_TARGETS, VOCAB_SIZE, make_peft_adapter, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread_for_module")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LoRARequest]]:
    root = tmp_path_factory.mktemp("graphs")
    base = make_tiny_model(root / "base", "llama")
    specs = [("q_proj", "v_proj"), ALL_TARGETS, ("gate_proj", "up_proj", "down_proj")]
    loras = [
        LoRARequest(
            f"a{i}", str(make_peft_adapter(base, root / f"a{i}", r=4 + 4 * i, seed=i, target_modules=t))
        )
        for i, t in enumerate(specs)
    ]
    return base, loras


def make_llm(base: Path, graphs: bool, ahead: bool = True) -> LLM:
    """ahead=False: synchronous steps, for tests that schedule and run a step by hand after step()."""
    llm = LLM(
        str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, max_lora_rank=16,
        max_loras=3, max_cpu_loras=3, max_num_seqs=8,
    )  # fmt: skip
    runner = llm.engine.runner
    assert runner.graphs is None  # CPU: the config flag is ignored
    if graphs:
        runner.graphs = runner.make_graphs(capture=False, max_batch=8)
    llm.engine.async_scheduling = ahead
    return llm


def eager(runner, batch, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The same step through the eager path (it writes the same KV again)."""
    graphs, runner.graphs = runner.graphs, None
    try:
        return runner.execute(batch, **kwargs).clone()
    finally:
        runner.graphs = graphs


def test_bucket_sizes_cover_every_batch() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(64)[:6] == [1, 2, 4, 8, 16, 24]
    assert bucket_sizes(64)[-1] == 64 and bucket_sizes(100)[-1] == 100
    for top in (1, 5, 33, 128, 256):
        sizes = bucket_sizes(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] == top
        assert all(any(b >= n for b in sizes) for n in range(1, top + 1))


def test_fixed_buffer_decode_equals_eager(model: tuple[Path, list[LoRARequest]]) -> None:
    """Mixed adapters (and none), batch sizes that pad to a bucket, long enough to cross block borders."""
    base, loras = model
    rng = random.Random(7)
    prompts = [[0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(3 + 2 * i)] for i in range(7)]
    mix = [loras[0], None, loras[1], loras[2], loras[1], None, loras[0]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eager = make_llm(base, graphs=False).generate(prompts, params, lora_request=mix)
    fixed_llm = make_llm(base, graphs=True)
    fixed = fixed_llm.generate(prompts, params, lora_request=mix)
    assert [o.outputs[0].token_ids for o in fixed] == [o.outputs[0].token_ids for o in eager]
    # The decode steps really went through the fixed buffers (7 sequences -> bucket 8).
    runner = fixed_llm.engine.runner
    assert runner.graphs is not None and runner.graphs.replays == 0 and runner.input.seq_lens[7] == 1
    assert runner.input.slot_mapping[7] == -1


def test_logits_and_grouping_match_eager_step(model: tuple[Path, list[LoRARequest]]) -> None:
    base, loras = model
    llm = make_llm(base, graphs=True, ahead=False)
    engine = llm.engine
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for lora in (loras[2], loras[0]):  # resident first, so all three requests decode together
        while engine.adapter_cache.acquire(lora) is None:
            engine.adapter_cache.wait_for_loads(timeout=1.0)
        engine.adapter_cache.release(lora)
    for i, lora in enumerate([loras[2], None, loras[0]]):
        engine.add_request(f"r{i}", [0, 5 + i, 9, 11 + i], params, lora=lora)
    while not all(r.num_output_tokens >= 1 for r in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()
    batch = engine.scheduler.schedule().scheduled  # allocates the next token's block
    assert len(batch) == 3 and all(n == 1 for _, n in batch)
    runner = engine.runner
    assert runner.graphs.bucket(batch) == (4, 4, 1)  # bucket 4, one padding row
    fixed = runner.execute(batch).clone()
    # The host-built grouping is make_lora_meta's, padding row included (slot -1 sorts last).
    g = runner.input
    ref = make_lora_meta(torch.from_numpy(g.token_slots[:4].copy()), g.num_segments_max)
    assert g.sorted[:4].tolist() == ref.sorted_token_ids.tolist()
    assert g.segs[0].tolist() == ref.seg_slots.tolist()
    assert g.segs[1].tolist() == ref.seg_starts.tolist()
    assert g.segs[2].tolist() == ref.seg_lens.tolist()
    assert g.token_slots[3] == -1
    torch.testing.assert_close(fixed, eager(runner, batch), rtol=1e-5, atol=1e-5)


def test_refuses_foreign_blocks_and_slots(model: tuple[Path, list[LoRARequest]]) -> None:
    """The fixed-buffer path keeps the eager path's guards: a bad block id or slot never reaches a kernel."""
    base, _ = model
    llm = make_llm(base, graphs=True, ahead=False)
    engine = llm.engine
    engine.add_request("x", [0, 5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.step()
    ((req, _),) = engine.scheduler.schedule().scheduled
    runner = engine.runner
    graphs = runner.graphs
    good = list(req.block_table)
    req.block_table = [*good[:-1], engine.runner.num_kv_blocks]
    assert graphs.accepts([(req, 1)])
    with pytest.raises(ValueError, match="block ids outside"):
        runner.execute([(req, 1)])
    req.block_table = good
    req.lora_slot = 3
    with pytest.raises(ValueError, match="lora slot 3 out of range"):
        runner.execute([(req, 1)])
    req.lora_slot = -1
    assert graphs.accepts([(req, 2)])  # a small extend step
    assert not graphs.accepts([(req, 2)] * 9)  # more sequences than the largest extend bucket
    assert not graphs.accepts([(req, 257)])  # more tokens than the largest extend bucket
    assert not graphs.accepts([(req, 1)] * 9)  # larger than the largest decode bucket


def test_fixed_buffer_extend_equals_eager(model: tuple[Path, list[LoRARequest]]) -> None:
    """Small extend steps (prefills, prefix-cache hits, mixed with decodes and adapters) through the fixed
    buffers: the padding sequence, empty rows and last-token gather give the eager step's logits."""
    base, loras = model
    llm = make_llm(base, graphs=True, ahead=False)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for lora in (loras[1], loras[2]):
        while engine.adapter_cache.acquire(lora) is None:
            engine.adapter_cache.wait_for_loads(timeout=1.0)
        engine.adapter_cache.release(lora)
    shared = [0, *range(40, 52)]  # three blocks of 4: a prefix-cache hit for the later requests
    engine.add_request("first", [*shared, 7], params, lora=loras[1])
    engine.step()
    engine.step()  # "first" now decodes
    engine.add_request("hit", [*shared, 8, 9, 10], params, lora=loras[1])
    engine.add_request("cold", [0, 61, 62, 63, 64, 65], params, lora=loras[2])
    engine.add_request("base", [0, 70, 71], params)
    batch = engine.scheduler.schedule().scheduled
    sizes = sorted(n for _, n in batch)
    assert sizes[0] == 1 and sizes[-1] > 1 and len(batch) == 4  # a decode mixed with prefills
    assert any(r.request_id == "hit" and r.num_computed_tokens > 0 for r, _ in batch)  # the cache hit
    runner, graphs, g = engine.runner, engine.runner.graphs, engine.runner.input
    assert graphs.accepts(batch)
    fixed = runner.execute(batch).clone()
    total = sum(n for _, n in batch)
    assert graphs.extend_steps == 2  # "first"'s prefill and this step (its decode went the decode way)
    # 4 sequences -> bucket 4 (no empty rows), the padding sequence in row 4 owns the padding tokens.
    assert g.query_start[4] == total and g.query_start[5] == 16
    ends = [int(x) for x in g.query_start[1:5]]
    assert g.seq_lens[4] == 16 - total and g.logit_idx[:4].tolist() == [e - 1 for e in ends]
    assert (g.slot_mapping[total:16] == -1).all() and (g.token_slots[total:16] == -1).all()
    torch.testing.assert_close(fixed, eager(runner, batch), rtol=1e-5, atol=1e-5)


def test_extend_steps_generate_like_eager(model: tuple[Path, list[LoRARequest]]) -> None:
    """Whole generations with prefix-cache hits and a chunked prompt: same tokens as the eager path."""
    base, loras = model
    rng = random.Random(11)
    shared = [0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(15)]
    prompts = [shared + [rng.randrange(4, VOCAB_SIZE) for _ in range(1 + i)] for i in range(5)]
    mix = [loras[0], loras[0], None, loras[2], loras[1]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = []
    for graphs in (False, True):
        llm = make_llm(base, graphs=graphs)
        first = llm.generate(prompts[:1], params, lora_request=mix[:1])
        rest = llm.generate(prompts[1:], params, lora_request=mix[1:])
        outputs.append([o.outputs[0].token_ids for o in first + rest])
        if graphs:
            g = llm.engine.runner.graphs
            assert g.extend_steps >= 2 and llm.engine.block_manager.stats.hit_tokens > 0
    assert outputs[0] == outputs[1]


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_and_peft(model: tuple[Path, list[LoRARequest]]) -> None:
    """Real capture and replay on the GPU (float32: exact kernels), batches shrinking through buckets and
    adapter mixes that need graph variants captured on first use; the oracle is transformers + PEFT."""
    from tests.helpers.hf_models import hf_greedy

    base, loras = model
    rng = random.Random(3)
    prompts = [[0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(4 + 3 * i)] for i in range(7)]
    mix = [loras[0], None, loras[1], loras[2], loras[1], None, loras[0]]
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(7)]

    def run(graphs: bool, capture_after: int = 1) -> tuple[list[list[int]], LLM]:
        llm = LLM(
            str(base), device="cuda", dtype="float32", block_size=4, num_kv_blocks=256, max_lora_rank=16,
            max_loras=3, max_cpu_loras=3, max_num_seqs=8, cuda_graphs=graphs,
        )  # fmt: skip
        assert (llm.engine.runner.graphs is not None) == graphs
        if graphs:
            llm.engine.runner.graphs.capture_after = capture_after
        outs = llm.generate(prompts, params, lora_request=mix)
        return [list(o.outputs[0].token_ids) for o in outs], llm

    replayed, llm = run(True)
    graphs = llm.engine.runner.graphs
    assert graphs.replays > 0
    at_start = (None, (True,) * 4, (True, True, False, False))
    assert any(mask not in at_start for *_, mask in graphs.graphs)  # a variant captured on use
    assert graphs.extend_steps > 0  # the prefills went through the extend graphs
    borrowing, llm = run(True, capture_after=1000)  # wider captured graphs replayed instead
    assert llm.engine.runner.graphs.borrowed > 0
    assert all(mask in at_start for *_, mask in llm.engine.runner.graphs.graphs)
    eager, _ = run(False)
    assert replayed == eager == borrowing
    oracle = hf_greedy(
        base,
        {lo.lora_name: Path(lo.lora_path) for lo in loras},
        prompts,
        [lo.lora_name if lo else None for lo in mix],
        max(p.max_tokens for p in params),
    )
    assert replayed == [o[: len(r)] for o, r in zip(oracle, replayed, strict=True)]


def test_mixed_step_runs_as_a_decode_and_an_extend_part(model: tuple[Path, list[LoRARequest]]) -> None:
    """A step too wide for one extend graph (10 decodes + a new prompt) runs as two fixed-buffer parts;
    the logits come back in the batch's order and equal the eager step's."""
    base, loras = model
    llm = LLM(
        str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, max_lora_rank=16,
        max_loras=3, max_cpu_loras=3, max_num_seqs=16,
    )  # fmt: skip
    engine, runner = llm.engine, llm.engine.runner
    engine.async_scheduling = False  # the test schedules the mixed step itself
    runner.graphs = runner.make_graphs(capture=False, max_batch=16)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for i in range(10):
        engine.add_request(f"d{i}", [0, 5 + i, 9, 11], params, lora=loras[i % 3] if i % 4 else None)
    while engine.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    engine.add_request("new", [0, 30, 31, 32, 33, 34], params, lora=loras[1])
    batch = engine.scheduler.schedule().scheduled
    assert len(batch) == 11 and sum(n > 1 for _, n in batch) == 1 and not runner.graphs.accepts(batch)
    batch = [batch[-1], *batch[:-1]]  # the prefill first: rows must come back in this order
    before = runner.graphs.extend_steps
    fixed = runner.execute(batch).clone()
    assert runner.graphs.extend_steps == before + 1
    torch.testing.assert_close(fixed, eager(runner, batch), rtol=1e-5, atol=1e-5)


def test_missing_variants_borrow_a_wider_graph_then_get_captured(
    model: tuple[Path, list[LoRARequest]],
) -> None:
    """Until a variant has been asked for capture_after times, a captured wider one is replayed: the
    widest extend sequence bucket, the all-groups mask; a step without adapters never borrows a LoRA one."""
    base, _ = model
    graphs = make_llm(base, graphs=True).engine.runner.graphs
    graphs.capture_enabled, graphs.capture_after = True, 3  # only _pick runs here: nothing is captured
    every, qkvo = all_groups_mask(), (True, True, False, False)
    graphs.graphs = dict.fromkeys(
        [(64, 8, 0, None), (64, 8, 0, every), (16, 16, 1, every), (32, 2, 0, qkvo), (12, 4, 3, every)]
    )
    assert graphs.pick((64, 1, 0), None) == (64, 8, 0, None)
    assert graphs.pick((64, 2, 0), qkvo) == (64, 8, 0, every)
    assert graphs.pick((32, 2, 0), qkvo) == (32, 2, 0, qkvo)  # captured: no borrowing
    assert graphs.pick((16, 16, 1), qkvo) == (16, 16, 1, every)
    assert graphs.pick((16, 16, 1), None) == (16, 16, 1, None)  # would need a capture: no LoRA graph for it
    assert graphs.pick((12, 4, 3), qkvo) == (12, 4, 3, every)  # a verify bucket borrows the same way
    assert graphs.borrowed == 4
    assert graphs.pick((16, 16, 1), qkvo) == (16, 16, 1, every)
    assert graphs.pick((16, 16, 1), qkvo) == (16, 16, 1, qkvo)  # the third request: capture it now


def test_a_borrowed_wider_graph_computes_the_same_logits(model: tuple[Path, list[LoRARequest]]) -> None:
    """Replaying with empty extra sequence rows and zero-rank LoRA groups gives the exact variant's logits."""
    base, loras = model
    outputs = []
    for wide in (False, True):
        llm = make_llm(base, graphs=True)
        graphs = llm.engine.runner.graphs
        if wide:
            graphs.pick = lambda b, m: (
                b[0],
                b[1] if b[2] else 8,
                b[2],
                None if m is None else all_groups_mask(),
            )
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        mix = [loras[0], None, loras[0]]  # loras[0] targets q and v only: borrowing adds three zero groups
        outs = llm.generate([[0, 7, 8, 9], [0, 10, 11], [0, 12, 13, 14, 15]], params, lora_request=mix)
        outputs.append([o.outputs[0].token_ids for o in outs])
        assert graphs.extend_steps > 0
    assert outputs[0] == outputs[1]


def test_no_extend_graphs_when_a_bucket_cannot_fit_a_table_row(model: tuple[Path, list[LoRARequest]]) -> None:
    """The padding sequence may hold a whole token bucket: buckets wider than a block-table row (a short
    max_model_len) are not offered, so it never reads past its row."""
    base, _ = model
    runner = make_llm(base, graphs=False).engine.runner

    def graphs_over(max_blocks: int) -> DecodeGraphs:
        g = runner.input
        step = StepInput(
            runner.device, g.max_tokens, g.max_rows, max_blocks, g.block_size, g.num_kv_blocks,
            g.vocab_size, g.num_slots,
        )  # fmt: skip
        return DecodeGraphs(step, runner._graph_forward, 8, g.vocab_size, capture=False)

    graphs = graphs_over(6)  # 24 tokens a row
    assert graphs.extend_tokens == [16]
    none = graphs_over(3)  # 12 tokens a row
    assert none.extend_tokens == []
    engine = make_llm(base, graphs=False).engine
    engine.add_request("x", [0, 5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0))
    ((req, n),) = engine.scheduler.schedule().scheduled
    assert n == 4 and graphs.accepts([(req, n)]) and not none.accepts([(req, n)])


def test_reset_restores_the_all_padding_step_captures_run_on(model: tuple[Path, list[LoRARequest]]) -> None:
    """capture_all runs on the step input's start contents; a set made after steps (a benchmark's) resets
    them first: after real steps and a reset, every buffer equals a fresh StepInput's."""
    base, loras = model
    llm = make_llm(base, graphs=False)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    llm.generate([[0, 7, 8, 9, 10], [0, 11, 12]], params, lora_request=[loras[0], None])
    step = llm.engine.runner.input
    g = step
    fresh = StepInput(
        g.device, g.max_tokens, g.max_rows, g.max_blocks, g.block_size, g.num_kv_blocks, g.vocab_size,
        g.num_slots,
    )  # fmt: skip
    assert not torch.equal(step.packed, fresh.packed)  # the steps left their data behind
    step.reset()
    assert torch.equal(step.packed, fresh.packed) and step.num_segments == 0
    assert (step.segs[0] == -1).all() and (step.slot_mapping == -1).all()
