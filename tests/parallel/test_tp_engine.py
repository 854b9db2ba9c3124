"""tensor_parallel_size=2 (gloo, two processes, float32) against transformers + PEFT and against one
rank, token for token, on batches that mix adapters of different ranks and targets with base requests,
chunked prefill, preemption and prefix-cache hits (tests/helpers/hf_families.check_family)."""

from __future__ import annotations

import pytest

from engine import LoRARequest, SamplingParams
from tests.helpers.hf_families import (
    GREEDY,
    check_family,
    make_family_model,
    make_llm,
    make_partial_rotary_phi3,
    prompts,
)
from tests.helpers.hf_models import hf_greedy, make_peft_adapter

pytestmark = pytest.mark.slow

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_ALL = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def tp2_equals_tp1(base, ps, loras) -> list[list[int]]:
    """Greedy tokens at tensor_parallel_size=2 equal one rank's; returns them."""
    expected = [o.outputs[0].token_ids for o in make_llm(base).generate(ps, GREEDY, lora_request=loras)]
    two = make_llm(base, tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(ps, GREEDY, lora_request=loras)] == expected
    finally:
        two.engine.close()
    return expected


def test_llama_tp2_equals_tp1_and_hf(tmp_path, one_torch_thread):
    base = make_family_model(tmp_path / "base", "llama")
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL, seed=1),
        # another rank, attention only: row-parallel o_proj with a column-parallel q/v in one slot
        "b": make_peft_adapter(
            base, tmp_path / "b", r=4, target_modules=("q_proj", "v_proj", "o_proj"), seed=2
        ),
    }
    check_family(base, adapters, lengths=(11, 17, 23), tensor_parallel_size=2)
    names = [*adapters, None]
    ps = prompts(len(names), 5, (9, 13))
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    one, two = make_llm(base), make_llm(base, tensor_parallel_size=2)
    try:
        expected = [o.outputs[0].token_ids for o in one.generate(ps, GREEDY, lora_request=loras)]
        assert [o.outputs[0].token_ids for o in two.generate(ps, GREEDY, lora_request=loras)] == expected
        assert two.engine.num_steps_ahead > 0  # async scheduling: sampled ids reach the workers in the buffer
        # Prompt logprobs: a hidden-states step, then logits a slice at a time (the LOGITS command).
        asking = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
        want = one.generate(ps, asking, lora_request=loras)
        got = two.generate(ps, asking, lora_request=loras)
        for w, g in zip(want, got, strict=True):
            assert w.prompt_logprobs is not None and g.prompt_logprobs is not None
            for we, ge in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True):
                assert we is not None and ge is not None and set(we) == set(ge)
                assert [ge[t].logprob for t in we] == pytest.approx(
                    [e.logprob for e in we.values()], abs=1e-4
                )
    finally:
        two.engine.close()


def test_phi3_fused_tp2_with_fewer_kv_heads_than_ranks(tmp_path, one_torch_thread):
    """Phi-3's fused qkv_proj / gate_up_proj are cut per part; one KV head is replicated on both ranks."""
    base = make_family_model(tmp_path / "base", "phi3", num_key_value_heads=1)
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=FUSED_ALL, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=4, target_modules=("qkv_proj",), seed=2),
    }
    check_family(base, adapters, lengths=(15, 22), tensor_parallel_size=2)


def test_gemma2_tp2_tied_vocab_parallel_head_and_softcaps(tmp_path, one_torch_thread):
    """Gemma 2: the tied embedding is the vocab-parallel head too; final logit softcap after the gather."""
    base = make_family_model(tmp_path / "base", "gemma2")
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=2, target_modules=("down_proj", "k_proj"), seed=2),
    }
    check_family(base, adapters, lengths=(12, 19), tensor_parallel_size=2)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_qk_norm_families_tp2_equal_tp1(tmp_path, one_torch_thread, arch):
    """Qwen3 and Gemma 3 (per-head q/k norms on each rank's heads; Gemma 3's sliding layers and local
    rope): TP=2 equals TP=1 with an adapter on every projection, base rows beside it."""
    base = make_family_model(tmp_path / "base", arch)
    adapter = make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL, seed=3)
    ps = prompts(4, 7, (10, 21))
    loras = [LoRARequest("a", str(adapter)), None] * 2
    expected = tp2_equals_tp1(base, ps, loras)
    base_only = [o.outputs[0].token_ids for o in make_llm(base).generate(ps, GREEDY)]
    assert base_only != expected  # the adapter changes the tokens


def test_graph_replays_reach_the_workers(tmp_path, one_torch_thread):
    """Rank 0's graph buckets (uncaptured on the CPU: the same padded layouts, run eagerly) go to the
    workers as REPLAY commands with the bucket's key; decode and extend steps equal one rank."""
    from engine.parallel import protocol

    base = make_family_model(tmp_path / "base", "llama")
    adapter = make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL, seed=4)
    ps = prompts(5, 9, (6, 11, 17))
    loras = [LoRARequest("a", str(adapter)), None, LoRARequest("a", str(adapter)), None, None]
    expected = [o.outputs[0].token_ids for o in make_llm(base).generate(ps, GREEDY, lora_request=loras)]
    two = make_llm(base, tensor_parallel_size=2, max_num_batched_tokens=24)
    runner = two.engine.runner
    try:
        runner.graphs = runner.make_graphs(capture=False)
        outs = two.generate(ps, GREEDY, lora_request=loras)
        again = two.generate(ps, GREEDY, lora_request=loras)  # prefix hits: small extend steps
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert [o.outputs[0].token_ids for o in again] == expected
        assert runner.workers.sent[protocol.REPLAY] > 0 and runner.graphs.extend_steps > 0
        assert runner.graphs.ahead_steps > 0  # async scheduling's device ids through a replay
    finally:
        two.engine.close()


def test_phi4_partial_rotary_tp2_equals_tp1(tmp_path, one_torch_thread):
    """Phi-4-mini's partial rotary: q/k rows reordered within each head after the cut (local head counts),
    adapters' B rows reordered at load before theirs; LongRoPE past the original context."""
    base = make_partial_rotary_phi3(tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "a", r=8, target_modules=FUSED_ALL, seed=5)
    ps = prompts(3, 11, (18, 25))
    loras = [LoRARequest("a", str(adapter)), None, LoRARequest("a", str(adapter))]
    tp2_equals_tp1(base, ps, loras)


def test_one_slot_rewritten_between_adapters_reaches_the_workers(tmp_path, one_torch_thread):
    """max_loras=1: adapters of different ranks and targets take turns in the one slot; each rewrite (on
    every rank, rows of a larger earlier adapter cleared) must land before the step that uses it."""
    from engine.parallel import protocol

    base = make_family_model(tmp_path / "base", "llama")
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=ALL, seed=6),
        "b": make_peft_adapter(base, tmp_path / "b", r=2, target_modules=("o_proj", "down_proj"), seed=7),
    }
    names = ["a", "b", None, "a", "b"]
    ps = prompts(len(names), 13, (8, 12))
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    settings = {"max_loras": 1, "max_cpu_loras": 2}
    expected = hf_greedy(base, adapters, ps, names, 8)
    two = make_llm(base, tensor_parallel_size=2, **settings)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(ps, GREEDY, lora_request=loras)] == expected
        # The mixed batch's order of admission is the scheduler's; alone, each request needs the slot
        # rewritten unless it already holds its adapter: b, a, b is at least a and then b over a's rows.
        before = two.engine.runner.workers.sent[protocol.SLOT]
        for name in ("b", "a", "b"):
            i = names.index(name)
            (out,) = two.generate([ps[i]], GREEDY, lora_request=[loras[i]])
            assert out.outputs[0].token_ids == expected[i], name
        assert two.engine.runner.workers.sent[protocol.SLOT] - before >= 2
    finally:
        two.engine.close()


def test_fully_sharded_loras_tp2_equals_tp1_and_hf(tmp_path, one_torch_thread):
    """fully_sharded_loras: q/k/v/gate/up A split by rank rows (max_lora_rank 7 padded to 8: 4 rows per
    rank), their shrinks all-gathered; a rank-5 adapter (rows on both ranks) and a rank-3 one (rank 1
    holds none of its rows) with other targets, base rows, chunked prefill, preemption and prefix hits
    equal transformers + PEFT; TP=1 (where the option is ignored) equals TP=2."""
    base = make_family_model(tmp_path / "base", "llama")
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=5, target_modules=ALL, seed=8),
        "b": make_peft_adapter(
            base, tmp_path / "b", r=3, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), seed=9
        ),
    }
    sharded = {"tensor_parallel_size": 2, "fully_sharded_loras": True, "max_lora_rank": 7}
    check_family(base, adapters, lengths=(11, 17, 23), **sharded)
    names = [*adapters, None, "b"]
    ps = prompts(len(names), 10, (9, 14))
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    one = make_llm(base, fully_sharded_loras=True, max_lora_rank=7)
    expected = [o.outputs[0].token_ids for o in one.generate(ps, GREEDY, lora_request=loras)]
    two = make_llm(base, **sharded)
    try:
        assert [o.outputs[0].token_ids for o in two.generate(ps, GREEDY, lora_request=loras)] == expected
        slots = two.engine.runner.adapter_cache.slots
        assert slots.a["q_proj"].shape[2] == 4 and slots.b["q_proj"].shape[3] == 8  # A's rows halved
        assert slots.a["o_proj"].shape[2] == 8  # row-parallel A: split by columns as before
    finally:
        two.engine.close()
