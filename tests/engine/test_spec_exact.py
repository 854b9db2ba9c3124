"""Speculative decoding changes how many tokens a step emits, never which: greedy (and seeded) outputs equal
those without speculation and transformers + PEFT, on batches mixing adapters, base requests, prefix hits
and preemptions (float32, tiny random Llama)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LoRARequest, SamplingParams
from tests.engine.spec_helpers import ScriptedProposer, continuations, make_llm, ngram, prompts
from tests.helpers.hf_models import ALL_TARGETS, hf_greedy, make_peft_adapter, make_tiny_model

ADAPTERS = {
    "r2-qv": {"r": 2, "target_modules": ("q_proj", "v_proj")},
    "r8-all": {"r": 8, "target_modules": ALL_TARGETS},
}
NAMES = ["r2-qv", None, "r8-all", None, "r2-qv", "r8-all"]


pytestmark = pytest.mark.usefixtures("one_torch_thread_for_module")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("spec-llama")
    base = make_tiny_model(root / "base", "llama")
    adapters = {
        n: make_peft_adapter(base, root / n, seed=i, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())
    }
    return base, adapters


def loras(adapters: dict[str, Path], names: list[str | None]) -> list[LoRARequest | None]:
    return [LoRARequest(n, str(adapters[n])) if n else None for n in names]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_ngram_greedy_equals_no_speculation_and_hf_with_adapters_and_preemption(llama, prefix_caching):
    base, adapters = llama
    ps = prompts(len(NAMES), seed=5, lengths=(9, 13))
    lr = loras(adapters, NAMES)
    # 6 requests of up to 27 tokens need 42 blocks of 4: 14 blocks force preemptions.
    plain = make_llm(base, num_kv_blocks=14, enable_prefix_caching=prefix_caching)
    spec = make_llm(base, ngram(), num_kv_blocks=14, enable_prefix_caching=prefix_caching)
    expected = tokens(plain.generate(ps, GREEDY, lora_request=lr))
    got = tokens(spec.generate(ps, GREEDY, lora_request=lr))
    assert got == expected == hf_greedy(base, adapters, ps, NAMES, 14)
    stats = spec.engine.spec.stats
    assert spec.engine.scheduler.num_preemptions > 0
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # some accepted, some rejected
    assert spec.engine.block_manager.num_free_blocks == 14


def test_scripted_drafts_accepted_all_some_or_none_keep_the_tokens(llama):
    base, adapters = llama
    ps = prompts(len(NAMES), seed=7)
    lr = loras(adapters, NAMES)
    expected = make_llm(base).generate(ps, GREEDY, lora_request=lr)
    spec = make_llm(base, ngram(k=3))
    spec.engine.spec.proposer = ScriptedProposer(continuations(spec, expected, ps, NAMES), wrong_every=2)
    got = spec.generate(ps, GREEDY, lora_request=lr)
    assert tokens(got) == tokens(expected)
    stats = spec.engine.spec.stats
    # Half the proposals are right: whole runs accepted; the others stop at their wrong token.
    assert stats.accepted_per_pos[0] > stats.accepted_per_pos[2] > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens
    # Fewer steps than tokens: several tokens per step.
    assert stats.num_accepted_tokens >= len(NAMES) * 4


def test_prefix_hits_and_cache_holds_only_accepted_tokens(llama):
    """Rejected drafts wrote KV past the accepted tokens: no cached block may hold a draft."""
    base, adapters = llama
    names = ["r8-all", None]
    lr = loras(adapters, names)
    ps = prompts(2, seed=9, lengths=(11, 14))
    expected = make_llm(base).generate(ps, GREEDY, lora_request=lr, cache_salt="t")
    spec = make_llm(base, ngram(k=4))
    spec.engine.spec.proposer = ScriptedProposer(continuations(spec, expected, ps, names), wrong_every=1)
    first = spec.generate(ps, GREEDY, lora_request=lr, cache_salt="t")
    assert tokens(first) == tokens(expected)
    bm = spec.engine.block_manager
    sequences = [p + o.outputs[0].token_ids for p, o in zip(ps, first, strict=True)]
    cached = [bm.blocks[b] for b in bm._cached.values()]
    assert cached
    for block in cached:  # every cached block is a block of some real sequence
        assert any(
            tuple(seq[i * 4 : i * 4 + 4]) == block.token_ids
            for seq in sequences
            for i in range(len(seq) // 4)
        ), block.token_ids
    # Prompts extended by their outputs hit the cache (output blocks included) and decode the same.
    longer = [seq[:20] for seq in sequences]
    plain = make_llm(base).generate(longer, GREEDY, lora_request=lr, cache_salt="t")
    spec.engine.spec.proposer = ScriptedProposer(continuations(spec, plain, longer, names), wrong_every=3)
    again = spec.generate(longer, GREEDY, lora_request=lr, cache_salt="t")
    assert [o.num_cached_tokens for o in again] == [16, 16]
    assert tokens(again) == tokens(plain)


def test_stop_string_stop_id_and_max_tokens_end_a_run_midway(llama):
    base, _ = llama
    ps = prompts(3, seed=11)
    full = make_llm(base).generate(ps, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    conts = continuations(None, full, ps, [None] * 3)
    tok = make_llm(base).get_tokenizer()
    stop_id = full[0].outputs[0].token_ids[5]
    stop_text = tok.decode(full[1].outputs[0].token_ids[6:8])
    params = [
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop_text]),
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),  # 7 = 1 + 5 + 1: no run ends there
    ]
    expected = make_llm(base).generate(ps, params)
    spec = make_llm(base, ngram(k=5))
    spec.engine.spec.proposer = ScriptedProposer(conts)  # always right: runs of 6 tokens
    got = spec.generate(ps, params)
    for a, b in zip(got, expected, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert (ca.token_ids, ca.text, ca.finish_reason, ca.stop_reason) == (
            cb.token_ids, cb.text, cb.finish_reason, cb.stop_reason
        )  # fmt: skip
    assert len(got[2].outputs[0].token_ids) == 7  # usage counts emitted tokens only
    assert spec.engine.spec.stats.num_accepted_tokens > 0


def test_logprobs_of_emitted_tokens_equal_no_speculation(llama):
    base, adapters = llama
    ps = prompts(2, seed=12)
    names = ["r2-qv", None]
    lr = loras(adapters, names)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=3)
    expected = make_llm(base).generate(ps, params, lora_request=lr)
    spec = make_llm(base, ngram(k=3))
    spec.engine.spec.proposer = ScriptedProposer(continuations(spec, expected, ps, names), wrong_every=2)
    got = spec.generate(ps, params, lora_request=lr)
    assert spec.engine.spec.stats.num_accepted_tokens > 0
    for a, b in zip(got, expected, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].logprobs) == 9
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert ea.keys() == eb.keys()
            assert all(ea[t] == pytest.approx(eb[t], abs=1e-4) for t in ea)


def test_seeded_sampling_gives_the_text_it_gives_without_speculation(llama):
    base, adapters = llama
    ps = prompts(3, seed=13)
    names = [None, "r8-all", None]
    lr = loras(adapters, names)
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=8, ignore_eos=True, logprobs=1),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=9, ignore_eos=True),
    ]
    expected = make_llm(base).generate(ps, params, lora_request=lr)
    spec = make_llm(base, ngram(k=4))
    spec.engine.spec.proposer = ScriptedProposer(continuations(spec, expected, ps, names), wrong_every=3)
    got = spec.generate(ps, params, lora_request=lr)
    assert tokens(got) == tokens(expected)
    assert spec.engine.spec.stats.num_accepted_tokens > 0
    # Positive control: the seed matters (a different one gives other text).
    other = make_llm(base).generate(
        ps[:1], SamplingParams(max_tokens=12, temperature=0.9, seed=70, ignore_eos=True)
    )
    assert tokens(other) != tokens(got[:1])


def test_streaming_hands_out_several_tokens_per_step(llama):
    base, _ = llama
    ps = prompts(2, seed=14)
    expected = make_llm(base).generate(ps, GREEDY)
    spec = make_llm(base, ngram(k=4))
    spec.engine.spec.proposer = ScriptedProposer(continuations(spec, expected, ps, [None, None]))
    engine = spec.engine
    for i, p in enumerate(ps):
        engine.add_request(f"s{i}", p, GREEDY)
    deltas: dict[str, list[int]] = {"s0": [], "s1": []}
    widest = 0
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id] += out.outputs[0].delta_token_ids
            widest = max(widest, len(out.outputs[0].delta_token_ids))
    assert [deltas["s0"], deltas["s1"]] == tokens(expected)
    assert widest == 5


def test_requests_that_cannot_speculate_share_the_batch(llama):
    """Penalties and min_tokens need the tokens before each row: those requests decode one token a step."""
    base, adapters = llama
    ps = prompts(3, seed=15)
    names = [None, "r2-qv", None]
    lr = loras(adapters, names)
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        GREEDY,
        SamplingParams(max_tokens=10, temperature=0.0, min_tokens=4),
    ]
    expected = make_llm(base).generate(ps, params, lora_request=lr)
    spec = make_llm(base, ngram(k=3))
    proposer = ScriptedProposer(continuations(spec, expected, ps, names))
    spec.engine.spec.proposer = proposer
    got = spec.generate(ps, params, lora_request=lr)
    assert tokens(got) == tokens(expected)
    assert spec.engine.spec.stats.num_drafts > 0
    assert proposer.calls == spec.engine.spec.stats.num_drafts  # only the plain one was ever asked


def test_padded_drafts_for_uniform_verify_steps_change_nothing(llama):
    """With CUDA graphs every decoding sequence verifies k tokens (missing drafts filled in), also those
    whose proposer found nothing and those a token or two from max_tokens."""
    base, adapters = llama
    ps = prompts(len(NAMES), seed=16)
    lr = loras(adapters, NAMES)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (5, 9, 14, 3, 11, 14)]
    expected = make_llm(base).generate(ps, params, lora_request=lr)
    spec = make_llm(base, ngram(k=3))
    conts = continuations(spec, expected, ps, NAMES)
    for i in (1, 3):  # these two never get a draft of their own
        conts[(tuple(ps[i]), NAMES[i], 0)] = []
    spec.engine.spec.proposer = ScriptedProposer(conts, wrong_every=3)
    spec.engine.spec.pad = True
    widths: list[set[int]] = []
    execute = spec.engine.runner.execute

    def record(batch, *args, **kwargs):
        widths.append({n for _, n in batch})
        return execute(batch, *args, **kwargs)

    spec.engine.runner.execute = record
    got = spec.generate(ps, params, lora_request=lr)
    assert tokens(got) == tokens(expected)
    assert [len(t) for t in tokens(got)] == [5, 9, 14, 3, 11, 14]
    verify_steps = [w for w in widths if 4 in w]
    assert verify_steps and all(w == {4} for w in verify_steps[1:])  # uniform once every row decodes


def test_a_late_arrival_collecting_prompt_logprobs_and_an_abort_mid_run(llama):
    """A step that computes a prompt whose logprobs are wanted verifies no drafts; an abort between
    speculative steps frees everything; the others' tokens do not change."""
    base, _ = llama
    ps = prompts(3, seed=17)
    late = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=2)

    def drive(llm):
        engine = llm.engine
        for i in range(2):
            engine.add_request(f"r{i}", ps[i], GREEDY)
        final = {}
        for step in range(40):
            if step == 3:
                engine.add_request("late", ps[2], late)
                engine.add_request("gone", ps[2], GREEDY)
            if step == 5:
                engine.abort("gone")
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
            if not engine.has_unfinished():
                break
        return final

    expected = drive(make_llm(base))
    spec = make_llm(base, ngram(k=3))
    conts = {(tuple(ps[i]), None, 0): expected[f"r{i}"].outputs[0].token_ids for i in range(2)}
    conts[(tuple(ps[2]), None, 0)] = expected["late"].outputs[0].token_ids
    spec.engine.spec.proposer = ScriptedProposer(conts)
    got = drive(spec)
    assert set(got) == {"r0", "r1", "late"}
    for rid in got:
        assert got[rid].outputs[0].token_ids == expected[rid].outputs[0].token_ids
    lp_got, lp_exp = got["late"].prompt_logprobs, expected["late"].prompt_logprobs
    assert lp_got is not None and len(lp_got) == len(ps[2])
    for a, b in zip(lp_got[1:], lp_exp[1:], strict=True):
        assert a.keys() == b.keys()
        assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)
    assert spec.engine.spec.stats.num_accepted_tokens > 0
    assert spec.engine.block_manager.num_free_blocks == spec.engine.block_manager.num_blocks
