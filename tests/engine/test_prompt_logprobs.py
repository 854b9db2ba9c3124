"""prompt_logprobs against transformers' own log-softmax of the prompt (demo model, CPU float32), with and
without an adapter, with chunked prefill cutting prompts across steps and a prefix cache that must not
stand in for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.request import Logprob
from tests.helpers.hf_models import hf_logits, load_hf

K = 3


def _prompt(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def _expected(model: Any, ids: list[int], adapter: str | None) -> torch.Tensor:
    return torch.log_softmax(hf_logits(model, ids, adapter), dim=-1)  # [T, V]


def _check(
    got: list[dict[int, Logprob] | None] | None, ids: list[int], lp: torch.Tensor, atol: float = 1e-4
) -> None:
    """Every position's prompt token (logprob, rank) and top-K against transformers' log-softmax `lp`.
    Ranks and top-K members are compared up to ties within `atol` (the device path's float32 rounding)."""
    assert got is not None and len(got) == len(ids) and got[0] is None
    for position in range(1, len(ids)):
        entry, row, token = got[position], lp[position - 1], ids[position]
        assert entry is not None
        value = row[token].item()
        assert entry[token].logprob == pytest.approx(value, abs=atol)
        assert int((row > value + atol).sum()) + 1 <= entry[token].rank <= int((row > value - atol).sum()) + 1
        top = sorted((e for t, e in entry.items() if e.rank <= K), key=lambda e: e.rank)
        assert [e.rank for e in top] == list(range(1, K + 1))
        assert [e.logprob for e in top] == pytest.approx(row.topk(K).values.tolist(), abs=atol)
        for tid, e in entry.items():
            assert e.logprob == pytest.approx(row[tid].item(), abs=atol)
        assert len(entry) in (K, K + 1)  # the top-K, plus the prompt token when it is not among them


@pytest.fixture(scope="module")
def hf(demo: Path) -> Any:
    adapters = demo / "adapters"
    return load_hf(demo, {"attn": adapters / "demo-attn", "mlp": adapters / "demo-mlp"})


def _llm(demo: Path, **kw: Any) -> LLM:
    config = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "block_size": 4}
    return LLM(str(demo), **{**config, **kw})


def test_prompt_logprobs_equal_transformers_with_and_without_adapters(
    demo: Path, hf: Any, one_torch_thread: None
) -> None:
    # A 16-token step budget cuts the 40-token prompts into chunks over several steps.
    llm = _llm(demo, max_num_batched_tokens=16)
    vocab = llm.engine.vocab_size
    prompts = [_prompt(i, 40 if i < 3 else 9, vocab) for i in range(4)]
    adapters = demo / "adapters"
    loras = [
        None,
        LoRARequest("attn", str(adapters / "demo-attn")),
        LoRARequest("mlp", str(adapters / "demo-mlp")),
        None,
    ]
    names = [None, "attn", "mlp", None]
    asking = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=K)
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, [asking, asking, asking, plain], lora_request=loras)
    for ids, name, out in zip(prompts[:3], names[:3], outs[:3], strict=True):
        _check(out.prompt_logprobs, ids, _expected(hf, ids, name))
    assert outs[3].prompt_logprobs is None
    # The generated tokens are those of a run without prompt logprobs.
    again = llm.generate(prompts, plain, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_prompt_logprobs_skip_the_prefix_cache(demo: Path, hf: Any, one_torch_thread: None) -> None:
    llm = _llm(demo)
    ids = _prompt(7, 33, llm.engine.vocab_size)
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    first = llm.generate([ids], plain)[0]
    cached = llm.generate([ids], plain)[0]
    assert first.num_cached_tokens == 0 and cached.num_cached_tokens == 32  # the cache holds the prompt
    asking = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K, n=2)
    out = llm.generate([ids], asking)[0]
    assert out.num_cached_tokens == 0  # computed, not read from the cache: every position has logits
    _check(out.prompt_logprobs, ids, _expected(hf, ids, None))
    assert [o.token_ids for o in out.outputs] == [cached.outputs[0].token_ids] * 2


def test_prompt_logprobs_are_range_checked() -> None:
    from engine.sampling_params import SamplingParamsError

    for bad in (-1, 21, 1.5, True):
        with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_prompt_logprobs_survive_preemption(demo: Path, hf: Any, one_torch_thread: None) -> None:
    # 4 requests of 30 + 8 tokens need 40 blocks of 4; 14 blocks force preemptions and recomputes, which
    # must neither repeat nor drop a position.
    llm = _llm(demo, num_kv_blocks=14, max_num_batched_tokens=12)
    prompts = [_prompt(20 + i, 30, llm.engine.vocab_size) for i in range(4)]
    asking = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=K)
    outs = llm.generate(prompts, asking)
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outs, strict=True):
        _check(out.prompt_logprobs, ids, _expected(hf, ids, None))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_prompt_logprobs_on_the_gpu_equal_transformers(demo: Path, hf: Any, cuda_graphs: bool) -> None:
    """The device path (Triton kernels, CUDA graphs and async scheduling on for the decode steps around
    the prefills) against transformers on the CPU, float32."""
    # A fixed KV cache: the other parametrisation's engine may still hold device memory.
    llm = LLM(
        str(demo), device="cuda", dtype="float32", max_model_len=256, block_size=16, kernel_backend="triton",
        cuda_graphs=cuda_graphs, async_scheduling=True, max_num_batched_tokens=32, num_kv_blocks=64,
    )  # fmt: skip
    adapters = demo / "adapters"
    prompts = [_prompt(40 + i, 50, llm.engine.vocab_size) for i in range(3)]
    loras = [
        None,
        LoRARequest("attn", str(adapters / "demo-attn")),
        LoRARequest("mlp", str(adapters / "demo-mlp")),
    ]
    asking = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=K)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate([*prompts, prompts[0]], [asking, asking, asking, plain], lora_request=[*loras, None])
    for ids, name, out in zip(prompts, [None, "attn", "mlp"], outs, strict=False):
        _check(out.prompt_logprobs, ids, _expected(hf, ids, name), atol=2e-3)
    assert outs[0].outputs[0].token_ids == outs[3].outputs[0].token_ids


def test_prompt_logprobs_hold_a_slice_of_logits_at_a_time(
    demo: Path, hf: Any, one_torch_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits are made from hidden states a slice of rows at a time, never for a whole 40-token chunk."""
    import engine.prompt_logprobs as module

    monkeypatch.setattr(module, "ROWS_PER_SLICE", 8)
    llm = _llm(demo, max_num_batched_tokens=64)
    runner = llm.engine.runner
    sizes: list[int] = []
    make_logits = runner.logits
    monkeypatch.setattr(runner, "logits", lambda h: sizes.append(h.shape[0]) or make_logits(h))
    ids = _prompt(3, 40, llm.engine.vocab_size)
    out = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K))[0]
    _check(out.prompt_logprobs, ids, _expected(hf, ids, None))
    assert sizes and max(sizes) <= 8 and sum(sizes) == 39 + 1  # 39 prompt rows in 8s, 1 row to sample
