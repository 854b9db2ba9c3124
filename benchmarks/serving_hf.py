"""Workload c: transformers + PEFT (mixed adapters through `adapter_names`) against our engine on the same
batch, plus the oracle check of our logits and greedy tokens against it."""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.serving_model import hf_twin
from benchmarks.serving_workloads import Bench, make_resident, timer_of
from engine.request import LoRARequest
from engine.sampling_params import SamplingParams


def _sync(bench: Bench) -> None:
    if bench.cuda:
        torch.cuda.synchronize()


def _hf_generate(bench: Bench, model: Any, ids: torch.Tensor, new: int, **kw: Any) -> float:
    _sync(bench)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            **kw,
        )
    _sync(bench)
    return time.perf_counter() - start


def _ours(bench: Bench, prompts: list[list[int]], loras: list[LoRARequest | None], new: int) -> float:
    """Wall time from submitting the batch to its last token (fresh salts: no prefix-cache help)."""
    engine = bench.engine
    tag = bench.tag("c")
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, (p, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"{tag}-{i}", p, params, lora=lora, cache_salt=f"{tag}-{i}")
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def _greedy(bench: Bench, prompts: list[list[int]], loras: list[LoRARequest | None], new: int) -> list[Any]:
    engine = bench.engine
    tag = bench.tag("chk")
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"{tag}-{i}", p, params, lora=lora, cache_salt=f"{tag}-{i}")
    tokens: dict[str, list[int]] = {}
    first: dict[str, torch.Tensor] = {}
    timer = timer_of(bench)
    timer.rows = []
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] = list(o.outputs[0].token_ids)
    for req, outputs_before, logits in timer.rows:
        if outputs_before == 0:
            first[req.request_id] = logits  # the last such row: its prompt's last position
    timer.rows = None
    keys = [f"{tag}-{i}" for i in range(len(prompts))]
    return [torch.stack([first[k] for k in keys]), [tokens[k] for k in keys]]


def workload_c(bench: Bench) -> dict[str, Any]:
    s = bench.sizes
    engine = bench.engine
    device = engine.runner.device
    adapters = [bench.qkvo.lora(i) for i in range(s.c_adapters)]
    prompts = [bench.prompt(s.c_prompt) for _ in range(s.c_batch)]
    mix = [adapters[i % len(adapters)] for i in range(s.c_batch)]
    ids = torch.tensor(prompts, device=device)

    from peft import PeftModel

    hf = hf_twin(engine.model)
    # bf16 adapters like ours (PEFT would otherwise upcast them to float32: a slower baseline).
    peft = PeftModel.from_pretrained(
        hf, adapters[0].lora_path, adapter_name="a0", autocast_adapter_dtype=False
    )
    for i, lora in enumerate(adapters[1:], start=1):
        peft.load_adapter(lora.lora_path, adapter_name=f"a{i}", autocast_adapter_dtype=False)
    peft.eval()
    names = [f"a{i % len(adapters)}" for i in range(s.c_batch)]

    # Oracle check first: our prefill logits and greedy tokens against HF + PEFT, mixed with base rows.
    chk_prompts = prompts[:4]
    chk_loras: list[LoRARequest | None] = [adapters[0], None, adapters[-1], None]
    chk_names = ["a0", "__base__", f"a{len(adapters) - 1}", "__base__"]
    make_resident(bench, adapters)
    ours_logits, ours_tokens = _greedy(bench, chk_prompts, chk_loras, 16)
    engine.async_scheduling = False  # the same check with synchronous steps: async must change nothing
    try:
        sync_logits, sync_tokens = _greedy(bench, chk_prompts, chk_loras, 16)
        # And once more synchronously: how far two identical runs drift (split-K atomics sum in any order).
        again_logits, again_tokens = _greedy(bench, chk_prompts, chk_loras, 16)
    finally:
        engine.async_scheduling = True
    with torch.inference_mode():
        ref = peft(input_ids=ids[:4], adapter_names=chk_names).logits[:, -1].float()
        ref_tokens = peft.generate(
            input_ids=ids[:4], attention_mask=torch.ones_like(ids[:4]), max_new_tokens=16, min_new_tokens=16,
            do_sample=False, pad_token_id=0, adapter_names=chk_names,
        )[:, ids.shape[1]:].tolist()  # fmt: skip
    rel = float((ours_logits - ref).norm() / ref.norm())
    same = sum(
        a == b
        for seq_a, seq_b in zip(ours_tokens, ref_tokens, strict=True)
        for a, b in zip(seq_a, seq_b, strict=True)
    )
    first_same = sum(seq_a[0] == seq_b[0] for seq_a, seq_b in zip(ours_tokens, ref_tokens, strict=True))

    # Warm-up every path once (compilation, handles, adapter loads), then time.
    with peft.disable_adapter():
        _hf_generate(bench, peft, ids, 2)
        hf_base = _hf_generate(bench, peft, ids, s.c_new)
    peft.set_adapter("a0")
    _hf_generate(bench, peft, ids, 2)
    hf_one = _hf_generate(bench, peft, ids, s.c_new)
    _hf_generate(bench, peft, ids, 2, adapter_names=names)
    hf_mixed = _hf_generate(bench, peft, ids, s.c_new, adapter_names=names)
    _ours(bench, prompts, mix, s.c_new)
    ours_mixed = _ours(bench, prompts, mix, s.c_new)
    ours_base = _ours(bench, prompts, [None] * s.c_batch, s.c_new)
    del peft, hf
    tokens = s.c_batch * s.c_new
    return {
        "batch": s.c_batch,
        "prompt": s.c_prompt,
        "new_tokens": s.c_new,
        "adapters": len(adapters),
        "hf_base_tokens_per_s": tokens / hf_base,
        "hf_one_adapter_tokens_per_s": tokens / hf_one,
        "hf_mixed_tokens_per_s": tokens / hf_mixed,
        "ours_base_tokens_per_s": tokens / ours_base,
        "ours_mixed_tokens_per_s": tokens / ours_mixed,
        "speedup_mixed": hf_mixed / ours_mixed,
        "check_prefill_logits_rel_err": rel,
        "check_greedy_tokens_equal": same / (len(chk_prompts) * 16),
        "check_first_token_equal": first_same / len(chk_prompts),
        "check_async_tokens_equal_sync": ours_tokens == sync_tokens,
        "check_async_vs_sync_logits_rel_err": float((ours_logits - sync_logits).norm() / sync_logits.norm()),
        "check_sync_repeat_tokens_equal": again_tokens == sync_tokens,
        "check_sync_repeat_logits_rel_err": float((again_logits - sync_logits).norm() / sync_logits.norm()),
    }
