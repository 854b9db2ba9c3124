"""LLM.generate against transformers + PEFT, token for token (greedy, float32, small random models).

The oracle batches by adapter with PEFT's mixed-batch `adapter_names`; our side mixes everything in one
engine, with prefix-cache hits, preemptions and chunked prefill changing how the work is cut, never what
comes out.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLM, LoRARequest, SamplingParams
from tests.helpers.hf_models import (
    ALL_TARGETS,
    LLAMA3_ROPE,
    VOCAB_SIZE,
    hf_greedy,
    make_peft_adapter,
    make_tiny_model,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

# Different ranks and target sets, so one batch mixes shapes.
ADAPTERS = {
    "r2-qv": {"r": 2, "target_modules": ("q_proj", "v_proj")},
    "r4-all": {"r": 4, "target_modules": ALL_TARGETS},
    "r8-ko-down": {"r": 8, "target_modules": ("k_proj", "o_proj", "down_proj"), "use_rslora": True},
    "r16-mlp": {"r": 16, "target_modules": ("gate_proj", "up_proj"), "alpha": 8},
}


def prompts(n: int, seed: int, lengths: tuple[int, ...] = (5, 9, 13, 17)) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(lengths[i % len(lengths)] - 1)] for i in range(n)
    ]


pytestmark = pytest.mark.usefixtures("one_torch_thread_for_module")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("llama")
    base = make_tiny_model(root / "base", "llama")
    adapters = {
        name: make_peft_adapter(base, root / name, seed=i, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    return base, adapters


def make_llm(base: Path, **overrides) -> LLM:
    config = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_kv_blocks": 128, "max_lora_rank": 16}
    config.update(overrides)
    return LLM(str(base), **config)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_base_model_only(llama):
    base, _ = llama
    ps = prompts(6, seed=1)
    outs = make_llm(base).generate(ps, GREEDY)
    assert tokens(outs) == hf_greedy(base, {}, ps, [None] * 6, 8)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert [o.prompt_token_ids for o in outs] == ps


def test_one_adapter(llama):
    base, adapters = llama
    ps = prompts(4, seed=2)
    lora = LoRARequest("r4-all", str(adapters["r4-all"]))
    outs = make_llm(base).generate(ps, GREEDY, lora_request=lora)
    expected = hf_greedy(base, {"r4-all": adapters["r4-all"]}, ps, ["r4-all"] * 4, 8)
    assert tokens(outs) == expected
    # The adapter really changes the output (else this test could not catch a dropped LoRA path).
    assert expected != hf_greedy(base, {}, ps, [None] * 4, 8)


@pytest.mark.parametrize("max_loras", [4, 2, 1])
def test_batch_mixing_four_adapters_of_different_ranks_and_targets_with_base(llama, max_loras):
    base, adapters = llama
    names: list[str | None] = [*ADAPTERS, None, "r2-qv", None, "r16-mlp", "r4-all", "r8-ko-down"]
    ps = prompts(len(names), seed=3)
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    llm = make_llm(base, max_loras=max_loras, max_cpu_loras=4)
    outs = llm.generate(ps, GREEDY, lora_request=loras)
    assert tokens(outs) == hf_greedy(base, adapters, ps, names, 8)
    stats = llm.engine.adapter_cache.stats()
    assert stats["loads"] == 4 and stats["pinned"] == 0


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss(llama):
    base, adapters = llama
    shared = prompts(1, seed=4, lengths=(21,))[0]
    ps = [[*shared, 7, 8, 9], [*shared, 10, 11]]
    lora = LoRARequest("r2-qv", str(adapters["r2-qv"]))
    expected = hf_greedy(base, {"r2-qv": adapters["r2-qv"]}, ps, ["r2-qv"] * 2, 8)
    llm = make_llm(base)
    first = llm.generate([ps[0]], GREEDY, lora_request=lora, cache_salt="t")[0]
    second = llm.generate([ps[1]], GREEDY, lora_request=lora, cache_salt="t")[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 20  # 5 full blocks of 4
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected
    cold = make_llm(base, enable_prefix_caching=False).generate(ps, GREEDY, lora_request=lora, cache_salt="t")
    assert [o.num_cached_tokens for o in cold] == [0, 0]
    assert tokens(cold) == expected


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_forced_by_a_tiny_kv_cache(llama, prefix_caching):
    base, adapters = llama
    names = ["r4-all", None, "r2-qv", None, "r8-ko-down", None]
    ps = prompts(len(names), seed=5, lengths=(9, 13))
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # 6 requests of up to 25 tokens would need 42 blocks; without the prefix cache they recompute from 0.
    llm = make_llm(base, num_kv_blocks=12, enable_prefix_caching=prefix_caching)
    outs = llm.generate(ps, params, lora_request=loras)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens(outs) == hf_greedy(base, adapters, ps, names, 12)
    assert llm.engine.block_manager.num_free_blocks == 12


def test_chunked_prefill_with_a_small_token_budget(llama):
    base, adapters = llama
    names = [None, "r16-mlp", "r4-all"]
    ps = prompts(3, seed=6, lengths=(23, 30, 17))
    loras = [LoRARequest(n, str(adapters[n])) if n else None for n in names]
    outs = make_llm(base, max_num_batched_tokens=7).generate(ps, GREEDY, lora_request=loras)
    assert tokens(outs) == hf_greedy(base, adapters, ps, names, 8)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8}),
        ("qwen2", {}),
        ("llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    ],
    ids=["mistral", "qwen2", "llama3-tied"],
)
def test_other_architectures_with_an_adapter_mixed_with_base(tmp_path, arch, overrides):
    base = make_tiny_model(tmp_path / "base", arch, **overrides)
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, target_modules=ALL_TARGETS)
    names = ["a", None, "a", None]
    ps = prompts(4, seed=7)
    loras = [LoRARequest("a", str(adapter)) if n else None for n in names]
    outs = make_llm(base, max_num_batched_tokens=16).generate(ps, GREEDY, lora_request=loras)
    assert tokens(outs) == hf_greedy(base, {"a": adapter}, ps, names, 8)


def test_cache_salt_isolates_tenants_with_a_positive_control(llama):
    base, _ = llama
    p = prompts(1, seed=8, lengths=(17,))[0]
    llm = make_llm(base)
    first = llm.generate([p], GREEDY, cache_salt="tenant-a")[0]
    same = llm.generate([p], GREEDY, cache_salt="tenant-a")[0]
    other = llm.generate([p], GREEDY, cache_salt="tenant-b")[0]
    unsalted = llm.generate([p], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens == 16  # positive control: the cache does work for the same tenant
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert first.outputs[0].token_ids == same.outputs[0].token_ids == other.outputs[0].token_ids


def test_prefix_cache_never_crosses_adapters(llama):
    base, adapters = llama
    p = prompts(1, seed=9, lengths=(17,))[0]
    llm = make_llm(base)
    a = LoRARequest("r2-qv", str(adapters["r2-qv"]))
    llm.generate([p], GREEDY, lora_request=a, cache_salt="t")
    renamed = LoRARequest("another-name", str(adapters["r2-qv"]))
    assert llm.generate([p], GREEDY, lora_request=renamed, cache_salt="t")[0].num_cached_tokens == 16
    other = LoRARequest("r2-qv", str(adapters["r4-all"]))  # same display name, other weights
    assert llm.generate([p], GREEDY, lora_request=other, cache_salt="t")[0].num_cached_tokens == 0
    assert llm.generate([p], GREEDY, cache_salt="t")[0].num_cached_tokens == 0


def test_parallel_samples_share_the_prompt_and_match_the_oracle(llama):
    base, _ = llama
    p = prompts(1, seed=10, lengths=(17,))[0]
    llm = make_llm(base)
    out = llm.generate([p], SamplingParams(n=3, max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    expected = hf_greedy(base, {}, [p], [None], 8)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == expected for c in out.outputs)
    # Samples 1 and 2 reused sample 0's four full prompt blocks instead of computing them.
    assert llm.engine.block_manager.stats.hit_tokens == 2 * 16


def test_text_prompts_and_detokenized_output(llama):
    base, _ = llama
    llm = make_llm(base)
    tok = llm.get_tokenizer()
    outs = llm.generate(["Hello, world!", [0, 50, 60]], GREEDY)
    ids = tok.encode("Hello, world!")
    assert outs[0].prompt_token_ids == ids and outs[0].prompt == "Hello, world!"
    assert outs[0].outputs[0].token_ids == hf_greedy(base, {}, [ids], [None], 8)[0]
    full = tok.decode(outs[1].outputs[0].token_ids, skip_special_tokens=True)
    assert outs[1].outputs[0].text == full.rstrip("\ufffd")


def test_same_seed_same_text_whatever_the_batch(llama):
    base, _ = llama
    ps = prompts(5, seed=11)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    free = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    alone = make_llm(base).generate([ps[0]], seeded)[0].outputs[0].token_ids
    mixed = make_llm(base, max_num_batched_tokens=9).generate(
        [ps[1], ps[2], ps[0], ps[3]], [free, free, seeded, free]
    )
    assert mixed[2].outputs[0].token_ids == alone
    other = make_llm(base).generate([ps[0]], SamplingParams(max_tokens=10, temperature=1.0, seed=43))[0]
    assert other.outputs[0].token_ids != alone


def _boundary_stop(tok, token_ids: list[int]) -> tuple[str, int] | None:
    """A 2-character string made of the last character of one token's text and the first of the next's."""
    texts = [tok.decode(token_ids[:i], skip_special_tokens=True) for i in range(len(token_ids) + 1)]
    for i in range(1, len(token_ids) - 1):
        a, b = texts[i][len(texts[i - 1]) :], texts[i + 1][len(texts[i]) :]
        if a and b and "\ufffd" not in texts[i + 1] and texts[i + 1].startswith(texts[i]):
            stop = a[-1] + b[0]
            return stop, texts[i + 1].find(stop)
    return None


def test_stop_string_across_token_boundaries(llama):
    base, _ = llama
    llm = make_llm(base)
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for seed in range(12, 30):
        p = prompts(1, seed=seed)[0]
        full = llm.generate([p], params)[0].outputs[0]
        found = _boundary_stop(tok, full.token_ids)
        if found is not None:
            break
    assert found is not None, "no usable token boundary in the sampled outputs"
    stop, at = found
    out = llm.generate([p], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full.text[:at] and stop not in c.text
    # Generation ended on the token that completed the stop string, not earlier or later.
    assert c.token_ids == full.token_ids[: len(c.token_ids)] and len(c.token_ids) < len(full.token_ids)
    assert stop in tok.decode(c.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(c.token_ids[:-1], skip_special_tokens=True)


def test_stop_token_ids_and_max_tokens(llama):
    base, _ = llama
    llm = make_llm(base)
    p = prompts(1, seed=13)[0]
    full = llm.generate([p], GREEDY)[0].outputs[0].token_ids
    out = llm.generate([p], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[full[3]]))[0]
    stop_at = full.index(full[3])
    assert out.outputs[0].token_ids == full[: stop_at + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == full[3]


def test_logprobs_match_hf(llama):
    import torch

    from tests.helpers.hf_models import hf_logits, load_hf

    base, _ = llama
    p = prompts(1, seed=14)[0]
    out = make_llm(base).generate(
        [p], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    )
    c = out[0].outputs[0]
    ref = torch.log_softmax(hf_logits(load_hf(base), p + c.token_ids), dim=-1)
    for step, entry in enumerate(c.logprobs):
        row = ref[len(p) - 1 + step]
        assert next(iter(entry)) == c.token_ids[step]
        for tid, lp in entry.items():
            assert lp == pytest.approx(row[tid].item(), abs=1e-4)
        assert set(row.topk(2).indices.tolist()) <= set(entry)


def test_bad_requests_are_refused_up_front(llama):
    base, _ = llama
    llm = make_llm(base, max_model_len=32)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[0, VOCAB_SIZE]], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[0, -1]], GREEDY)
    with pytest.raises(ValueError, match="context is 32"):
        llm.generate([list(range(32))], GREEDY)
    with pytest.raises(ValueError, match="at least one"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llm.generate([[0, 5]], GREEDY, cache_salt=["a", "b"])
    # A request that asks for more than the context gets what fits, finishing with "length".
    out = llm.generate([list(range(4, 30))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6 and out[0].outputs[0].finish_reason == "length"
    assert not llm.engine.has_unfinished()


def test_a_broken_adapter_fails_its_request_with_a_clear_error(llama, tmp_path):
    base, adapters = llama
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["r2-qv"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    llm = make_llm(base)
    with pytest.raises(RuntimeError, match="request failed"):
        llm.generate([[0, 5, 6]], GREEDY, lora_request=LoRARequest("broken", str(broken)))
    assert not llm.engine.has_unfinished()
    # The engine is fine afterwards.
    assert len(llm.generate([[0, 5, 6]], GREEDY)[0].outputs[0].token_ids) == 8


def test_eos_ends_the_output_unless_ignored_and_min_tokens_holds_it_off(llama):
    base, _ = llama
    llm = make_llm(base)
    p = prompts(1, seed=15)[0]
    full = llm.generate([p], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    llm.engine.eos_token_ids = (eos,)  # pretend the model's EOS is a token it really emits
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(full.token_ids[:first], skip_special_tokens=True).rstrip("\ufffd")
    ignored = llm.generate([p], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert ignored.outputs[0].token_ids == full.token_ids
    held = llm.generate([p], SamplingParams(max_tokens=12, min_tokens=first + 2, temperature=0.0))[0].outputs[
        0
    ]
    assert eos not in held.token_ids[: first + 2] and len(held.token_ids) >= first + 2


def test_abort_frees_blocks_and_adapter_pins(llama):
    base, adapters = llama
    llm = make_llm(base)
    engine = llm.engine
    lora = LoRARequest("r4-all", str(adapters["r4-all"]))
    engine.add_request("x", [0, 5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0.0), lora=lora)
    engine.add_request("y", [0, 9, 10], SamplingParams(max_tokens=50, temperature=0.0))
    while not engine.scheduler.running or len(engine.scheduler.running) < 2:
        engine.step()
    engine.step()
    out = engine.abort("x")
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids
    assert engine.abort("x") is None  # unknown / already gone
    assert engine.adapter_cache.stats()["pinned"] == 0
    held_by_y = len(engine.scheduler.running[0].block_table)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks - held_by_y
    engine.abort("y")
    assert (
        not engine.has_unfinished()
        and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    )


def test_parallel_seeded_samples_differ_and_the_first_matches_n1(llama):
    base, _ = llama
    p = prompts(1, seed=16)[0]
    llm = make_llm(base)
    many = llm.generate([p], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))[0]
    one = llm.generate([p], SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))[0]
    samples = [c.token_ids for c in many.outputs]
    assert samples[0] == one.outputs[0].token_ids
    assert len({tuple(x) for x in samples}) == 3


def test_a_large_offline_batch_shows_a_progress_bar(llama, capsys):
    base, _ = llama
    llm = make_llm(base)
    outs = llm.generate([[0, 4 + i] for i in range(32)], SamplingParams(max_tokens=1, temperature=0.0))
    assert len(outs) == 32 and [o.prompt_token_ids[1] for o in outs] == [4 + i for i in range(32)]
    assert "32/32" in capsys.readouterr().err
    llm.generate([[0, 4]], SamplingParams(max_tokens=1))
    assert "generating" not in capsys.readouterr().err


def test_colliding_sample_ids_are_refused_without_leaving_orphans(llama):
    base, _ = llama
    engine = make_llm(base).engine
    engine.add_request("x#1", [0, 5], GREEDY)
    with pytest.raises(ValueError, match="already"):
        engine.add_request("x", [0, 6], SamplingParams(n=2, max_tokens=4, temperature=0.0))
    assert set(engine.scheduler.requests) == {"x#1"}
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_slow_adapter_load_neither_blocks_base_requests_nor_spins(llama):
    import threading
    import time

    base, adapters = llama
    release = threading.Event()

    def slow_loader(lora: LoRARequest) -> str:
        release.wait(timeout=10)  # an S3 download that takes a while
        return str(lora.lora_path)

    llm = make_llm(base, adapter_loader=slow_loader)
    engine = llm.engine
    lora = LoRARequest("r2-qv", str(adapters["r2-qv"]))
    engine.add_request("slow", [0, 5, 6, 7], GREEDY, lora=lora)
    engine.add_request("base", [0, 8, 9, 10], GREEDY)
    steps, finished = 0, {}
    while "base" not in finished:
        finished.update({out.request_id: out for out in engine.step() if out.finished})
        steps += 1
    assert steps <= 9 and engine.scheduler.num_waiting == 1  # base ran; the adapter request waited
    start, idle_steps = time.monotonic(), 0
    while time.monotonic() - start < 0.3:
        assert engine.step() == []
        idle_steps += 1
    assert idle_steps <= 10, idle_steps  # each idle step waits for the load (~50 ms), it does not spin
    release.set()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    expected = hf_greedy(base, {"r2-qv": adapters["r2-qv"]}, [[0, 5, 6, 7]], ["r2-qv"], 8)[0]
    assert finished["slow"].outputs[0].token_ids == expected


def test_an_offline_step_that_raises_leaves_the_llm_usable_and_correct(llama):
    base, _ = llama
    llm = make_llm(base)
    p = prompts(1, seed=17, lengths=(13,))[0]
    real = llm.engine.runner.execute
    calls = {"n": 0}

    def flaky(batch, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("transient device error")
        return real(batch, **kw)

    llm.engine.runner.execute = flaky
    with pytest.raises(RuntimeError, match="transient"):
        llm.generate([p], GREEDY)
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    out = llm.generate([p], GREEDY)[0]
    assert out.num_cached_tokens == 0  # blocks registered by the failed step were not trusted
    assert out.outputs[0].token_ids == hf_greedy(base, {}, [p], [None], 8)[0]


def test_a_second_turn_reuses_the_first_turns_prompt_and_output_blocks(llama):
    base, _ = llama
    llm = make_llm(base)
    p = prompts(1, seed=18, lengths=(17,))[0]
    first = llm.generate([p], GREEDY, cache_salt="t")[0]
    follow_up = p + first.outputs[0].token_ids + [7, 8]  # 27 tokens; the first turn computed 24 of them
    second = llm.generate([follow_up], GREEDY, cache_salt="t")[0]
    assert second.num_cached_tokens == 24
    assert second.outputs[0].token_ids == hf_greedy(base, {}, [follow_up], [None], 8)[0]
