"""Workloads q (FP8 base weights) and r (deterministic mode), issue 20; not in the default set.

Each builds a second engine on the same random weights (same seed) beside the benchmark's bf16 one, so the
bf16 engine must leave room: on a GPU run them with `--memory-fraction 0.4` (the second engine takes up
to 85% of the device, counting the first).

q: decode tokens/s at B = 1 / 32 / 128, FP8 vs bf16 in the same process; the FP8 forward against its
   roofline (decode() counts the weights' bytes from the parameters: one byte per FP8 weight); 64 distinct
   q/k/v/o adapters on the FP8 base vs the FP8 base; the FP8 logits' relative error against the same
   model with every FP8 product replaced by a bf16 product on the dequantized weights (and against the
   original bf16 model).
r: decode at B = 64 (base and 64 q/k/v/o adapters) with deterministic mode on vs off, and the check:
   a request alone, in a batch of 64 mixed requests, and again, gives the same tokens and logprob bits.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving_model import make_engine, random_model
from benchmarks.serving_workloads import Bench, decode
from engine import quant
from engine.engine import LLMEngine
from engine.model_loader import LoadedModel, load_model
from engine.ops import AttentionBatch, Ops
from engine.quant.linear import Fp8Linear
from engine.request import LoRARequest
from engine.sampling_params import SamplingParams

# The second engine's share of the device (the first one's memory included).
SECOND_ENGINE_FRACTION = 0.85


def second_engine(bench: Bench, **changes: Any) -> LLMEngine:
    """An engine like the benchmark's on the same weights, with EngineConfig `changes` (quantization,
    deterministic) applied to the model the way load_model applies them."""
    config = dataclasses.replace(bench.engine.config, gpu_memory_fraction=SECOND_ENGINE_FRACTION, **changes)
    if bench.cuda:
        # The benchmark's model is made on the device from a seed (no weights on disk): the same again.
        base = bench.engine.model
        loaded = random_model(Path(config.model), base.dtype, base.device, seed=0)
        quant.prepare(
            loaded.model,
            quantize=config.quantization == "fp8",
            checkpoint_scales=None,
            deterministic=config.deterministic,
            device=loaded.device,
            dtype=loaded.dtype,
        )
        loaded.quantization = config.quantization
    else:
        loaded = load_model(config)

    def loader(lora: Any) -> str:
        return (bench.seven if lora.lora_name.startswith(bench.seven.prefix) else bench.qkvo).loader(lora)

    return make_engine(config, loaded, loader)


def _batches(bench: Bench) -> list[int]:
    return [1, 32, 128] if bench.cuda else bench.sizes.batch_sizes


def _free(engine: LLMEngine) -> None:
    engine.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def prefill_logits(loaded: LoadedModel, ops: Ops, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, V] of one sequence prefilled in one eager forward, on a KV cache of its own."""
    cfg, n, block_size, device = loaded.config, len(ids), 16, loaded.device
    blocks = -(-n // block_size)
    shape = (blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    kv = [
        (
            torch.zeros(shape, dtype=loaded.dtype, device=device),
            torch.zeros(shape, dtype=loaded.dtype, device=device),
        )
        for _ in range(cfg.num_layers)
    ]
    attn = AttentionBatch(
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
    )
    token_ids, positions = torch.tensor(ids, device=device), torch.arange(n, device=device)
    hidden = loaded.model(token_ids, positions, kv, attn, None, ops)
    return loaded.model.compute_logits(hidden)  # type: ignore[no-any-return]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def logit_errors(bench: Bench, fp8_engine: LLMEngine) -> dict[str, Any]:
    """The FP8 model's logits vs the same model with dequantized bf16 products, and vs the bf16 model."""
    loaded, ops = fp8_engine.model, fp8_engine.runner.ops
    ids = bench.prompt(64 if bench.cuda else 8)
    layers = [m for m in loaded.model.modules() if isinstance(m, Fp8Linear)]
    fp8_gemm = [m.fp8_gemm for m in layers]
    ours = prefill_logits(loaded, ops, ids)
    for m in layers:
        m.fp8_gemm = False
    try:
        dequantized = prefill_logits(loaded, ops, ids)
    finally:
        for m, flag in zip(layers, fp8_gemm, strict=True):
            m.fp8_gemm = flag
    original = prefill_logits(bench.engine.model, bench.engine.runner.ops, ids)
    return {
        "fp8_gemm_layers": sum(fp8_gemm),
        "fp8_layers": len(layers),
        "rel_err_vs_dequantized_bf16": _rel(ours, dequantized),
        "rel_err_vs_original_bf16": _rel(ours, original),
        "argmax_agreement_vs_dequantized": float((ours.argmax(-1) == dequantized.argmax(-1)).float().mean()),
    }


def _time_ms(fn: Any, cuda: bool, reps: int) -> float:
    """Median ms of fn() after two warm-up calls (CUDA events on a GPU, the host clock elsewhere)."""
    import statistics
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def gemm_table(bench: Bench, fp8_engine: LLMEngine) -> dict[str, Any]:
    """Each projection of layer 0 alone at each batch size: the bf16 product (F.linear), the FP8 layer
    (per-token activation quantization + torch._scaled_mm, or its fallback) and the activation
    quantization alone, with the weight bytes per microsecond each reaches: what the forward is made of."""
    import torch.nn.functional as F

    from kernels import fp8

    cuda = bench.cuda
    reps = 50 if cuda else 3
    ours, theirs = fp8_engine.model.model.layers[0], bench.engine.model.model.layers[0]
    pairs = {
        "qkv_proj": (ours.self_attn.qkv_proj, theirs.self_attn.qkv_proj),
        "o_proj": (ours.self_attn.o_proj, theirs.self_attn.o_proj),
        "gate_up_proj": (ours.mlp.gate_up_proj, theirs.mlp.gate_up_proj),
        "down_proj": (ours.mlp.down_proj, theirs.mlp.down_proj),
    }
    out: dict[str, Any] = {}
    for name, (q_layer, b_layer) in pairs.items():
        rows = {}
        weight = b_layer.weight
        for batch in _batches(bench):
            x = torch.randn(batch, weight.shape[1], device=weight.device, dtype=weight.dtype)
            bf16_ms = _time_ms(lambda x=x, w=weight: F.linear(x, w), cuda, reps)
            fp8_ms = _time_ms(lambda x=x, layer=q_layer: layer(x), cuda, reps)
            quant_ms = _time_ms(lambda x=x: fp8.quantize_tokens(x), cuda, reps)
            rows[str(batch)] = {
                "bf16_us": bf16_ms * 1e3,
                "fp8_us": fp8_ms * 1e3,
                "activation_quant_us": quant_ms * 1e3,
                "bf16_GBps": weight.numel() * weight.element_size() / bf16_ms / 1e6,
                "fp8_GBps": weight.numel() / fp8_ms / 1e6,
            }
        out[name] = rows
    return out


def _weight_bytes(loaded: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def workload_q(bench: Bench) -> dict[str, Any]:
    b = bench.sizes.b_batch
    bench.qkvo.prepare(list(range(b)))
    qkvo = [bench.qkvo.lora(i) for i in range(b)]
    bf16 = {str(n): decode(bench, n, None) for n in _batches(bench)}
    engine = second_engine(bench, quantization="fp8")
    try:
        fp8_bench = dataclasses.replace(bench, engine=engine)
        fp8 = {str(n): decode(fp8_bench, n, None) for n in _batches(bench)}
        base = decode(fp8_bench, b, None)
        mixed = decode(fp8_bench, b, qkvo)
        errors = logit_errors(bench, engine)
        gemms = gemm_table(bench, engine)
        weights = {"bf16": _weight_bytes(bench.engine.model), "fp8": _weight_bytes(engine.model)}
    finally:
        _free(engine)
    result = {
        "bf16": bf16,
        "fp8": fp8,
        "fp8_over_bf16_tokens_per_s": {k: fp8[k]["tokens_per_s"] / bf16[k]["tokens_per_s"] for k in fp8},
        "fp8_over_bf16_forward": {k: bf16[k]["forward_ms"] / fp8[k]["forward_ms"] for k in fp8},
        "fp8_forward_over_roofline": {k: fp8[k]["forward_over_roofline"] for k in fp8},
        "fp8_base": base,
        "fp8_qkvo": mixed,
        "fp8_qkvo_over_base_throughput": mixed["tokens_per_s"] / base["tokens_per_s"],
        "logits": errors,
        "weight_bytes": weights,
        "gemm": gemms,
    }
    for k in fp8:
        print(
            f"q B={k}: bf16 {bf16[k]['tokens_per_s']:.0f} tok/s, fp8 {fp8[k]['tokens_per_s']:.0f} tok/s "
            f"(x{result['fp8_over_bf16_tokens_per_s'][k]:.2f}); fp8 forward {fp8[k]['forward_ms']:.2f} ms "
            f"= {fp8[k]['forward_over_roofline']:.2f}x its roofline",
            flush=True,
        )
    for name, by_batch in gemms.items():
        cells = ", ".join(
            f"B={k} bf16 {v['bf16_us']:.0f} / fp8 {v['fp8_us']:.0f} us (quant {v['activation_quant_us']:.0f})"
            for k, v in by_batch.items()
        )
        print(f"q {name}: {cells}", flush=True)
    print(
        f"q B={b}: {b} distinct q/k/v/o adapters on fp8 {result['fp8_qkvo_over_base_throughput']:.3f}x fp8 base; "
        f"logits rel err vs dequantized bf16 {errors['rel_err_vs_dequantized_bf16']:.2e}, vs original bf16 "
        f"{errors['rel_err_vs_original_bf16']:.2e}; FP8 products in {errors['fp8_gemm_layers']}/{errors['fp8_layers']} layers",
        flush=True,
    )
    return result


def _generate(
    engine: LLMEngine, prompts: list[list[int]], loras: list[LoRARequest | None], tag: str, new: int
) -> list[Any]:
    """(tokens, logprobs) of every request, run to completion together (greedy)."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p, lora in zip(ids, prompts, loras, strict=True):
        engine.add_request(rid, p, params, lora=lora)
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = (list(c.token_ids), [sorted(s.items()) for s in c.logprobs or []])
    return [done[i] for i in ids]


def identical_checks(bench: Bench, engine: LLMEngine) -> dict[str, Any]:
    """Request 0 (its own adapter) alone, among B mixed requests (adapters, base rows, other lengths),
    and the mixed batch again: equal tokens and equal logprob bits?"""
    b, new = bench.sizes.b_batch, (32 if bench.cuda else 4)
    rng_prompts = [bench.prompt(bench.sizes.decode_prompt // (1 + i % 3)) for i in range(b)]
    loras: list[LoRARequest | None] = [bench.qkvo.lora(i) if i % 4 else None for i in range(b)]
    loras[0] = bench.qkvo.lora(1)
    alone = _generate(engine, rng_prompts[:1], loras[:1], bench.tag("alone"), new)[0]
    mixed = _generate(engine, rng_prompts, loras, bench.tag("mixed"), new)
    again = _generate(engine, rng_prompts, loras, bench.tag("again"), new)
    return {
        "alone_vs_mixed_tokens": alone[0] == mixed[0][0],
        "alone_vs_mixed_logprob_bits": alone[1] == mixed[0][1],
        "run_to_run_tokens": [m[0] for m in mixed] == [a[0] for a in again],
        "run_to_run_logprob_bits": [m[1] for m in mixed] == [a[1] for a in again],
    }


def workload_r(bench: Bench) -> dict[str, Any]:
    b = bench.sizes.b_batch
    bench.qkvo.prepare(list(range(b)))
    qkvo = [bench.qkvo.lora(i) for i in range(b)]
    off = {"base": decode(bench, b, None), "qkvo": decode(bench, b, qkvo)}
    off_checks = identical_checks(bench, bench.engine)
    engine = second_engine(bench, deterministic=True)
    try:
        det = dataclasses.replace(bench, engine=engine)
        on = {"base": decode(det, b, None), "qkvo": decode(det, b, qkvo)}
        on_checks = identical_checks(det, engine)
    finally:
        _free(engine)
    result = {
        "batch": b,
        "off": off,
        "on": on,
        "on_over_off_tokens_per_s": {k: on[k]["tokens_per_s"] / off[k]["tokens_per_s"] for k in on},
        "on_over_off_forward": {k: off[k]["forward_ms"] / on[k]["forward_ms"] for k in on},
        "identical_deterministic": on_checks,
        "identical_default": off_checks,  # for the record: what the default mode gives
    }
    for k in on:
        print(
            f"r B={b} {k}: deterministic {on[k]['tokens_per_s']:.0f} tok/s vs {off[k]['tokens_per_s']:.0f} "
            f"(x{result['on_over_off_tokens_per_s'][k]:.3f})",
            flush=True,
        )
    print(f"r identical, deterministic: {on_checks}; default mode: {off_checks}", flush=True)
    return result
