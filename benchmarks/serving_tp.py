"""Tensor parallelism (issue 16): decode tokens/s at TP=N against TP=1 in the same run, with and without
64 distinct q/k/v/o adapters, and a 70B-shaped model's decode step against its per-GPU roofline.

Not one of benchmarks/serving.py's workloads: those share one engine, and this one builds an engine per
tensor-parallel size (each with its own worker processes). Random weights (std 0.02, seeded) are drawn
on every rank's GPU and cut there, so no checkpoint is written.

    python -m benchmarks.serving_tp --smoke --out /tmp/tp                          # CPU, gloo, ~1 min
    python -m benchmarks.serving_tp --out /tmp/tp --tp 2                            # 2 GPUs, 8B shape
    python -m benchmarks.serving_tp --out /tmp/tp70 --shape 70b --tp 4 --batch-sizes 32 --no-adapters \
        --skip-one-gpu                                                              # 4 GPUs, 70B shape
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving_adapters import QKVO, SeededAdapters
from benchmarks.serving_model import (
    make_engine,
    model_config,
    random_model,
    random_weights,
    write_model_folder,
)
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_config import ModelConfig
from engine.sampling_params import SamplingParams

SHAPES = {  # Llama-3-70B's shape over model_config("llama") (Llama-3-8B's)
    "8b": {},
    "70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
}


def rank_weights(cfg: ModelConfig, device: torch.device, dtype: str, seed: int) -> Any:
    """A WeightSource (engine/parallel/loading.py): the same random weights on every rank."""
    return random_weights(cfg, getattr(torch, dtype), device, seed)


def decode(engine: LLMEngine, batch: int, prompt: int, steps: int, loras: list[Any]) -> dict[str, float]:
    """`batch` sequences (adapters round-robin, none when empty) prefilled, then `steps` timed decode steps."""
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    vocab = engine.vocab_size
    for i in range(batch):
        ids = [(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(prompt)]
        engine.add_request(
            f"r{time.monotonic_ns()}-{i}", ids, params, lora=loras[i % len(loras)] if loras else None
        )
    while (
        any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running)
        or engine.scheduler.num_waiting
    ):
        engine.step()
    for _ in range(2):  # warm-up
        engine.step()
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    seconds = time.perf_counter() - start
    for request_id in list(engine.groups):
        engine.abort(request_id)
    return {"batch": batch, "step_ms": 1e3 * seconds / steps, "tokens_per_s": batch * steps / seconds}


def roofline_ms(cfg: ModelConfig, tp: int, element: int, bandwidth: float) -> float:
    """Per-GPU bytes of one decode step (its weight shard, the embedding's rows aside) over `bandwidth`."""
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i
    return 1e3 * element * (layers * per_layer + v * h) / tp / bandwidth


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny demo model, TP 1 and 2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--adapters", type=int, default=64, help="distinct q/k/v/o adapters (0: none)")
    parser.add_argument("--no-adapters", action="store_true")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--no-graphs", action="store_true", help="every step eager (cuda_graphs=False)")
    parser.add_argument(
        "--fully-sharded-loras",
        action="store_true",
        help="the TP engines shard LoRA A too (docs/parallel.md)",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="the adapters' rank and max_lora_rank")
    parser.add_argument(
        "--skip-one-gpu", action="store_true", help="no run of the one-GPU engine (as served)"
    )
    args = parser.parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from engine.demo import write_demo_model

        folder = work / "demo"
        write_demo_model(folder)
        sizes, steps, prompt, n_adapters, dtype = [1, 4], 3, 16, 4, "float32"
        common: dict[str, Any] = {"device": "cpu", "dtype": dtype, "num_kv_blocks": 256}
        weights = None
    else:
        raw = {**model_config("llama"), **SHAPES[args.shape]}
        folder = write_model_folder(work / f"llama-{args.shape}-shaped", raw)
        sizes, steps, prompt, n_adapters, dtype = (
            args.batch_sizes,
            args.steps,
            args.prompt,
            args.adapters,
            "bfloat16",
        )
        common = {"device": "cuda", "dtype": dtype, "max_model_len": 4096,
                  "cuda_graphs": not args.no_graphs}  # fmt: skip
        weights = functools.partial(rank_weights, dtype=dtype, seed=0)
    if args.no_adapters:
        n_adapters = 0
    common["max_lora_rank"] = args.lora_rank
    results: dict[str, Any] = {
        "shape": "demo" if args.smoke else args.shape, "lora_rank": args.lora_rank,
        "fully_sharded_loras": args.fully_sharded_loras, "runs": [],
    }  # fmt: skip
    if not args.skip_one_gpu:
        # The one-GPU engine as served (CUDA graphs on CUDA): the baseline the targets name.
        config = EngineConfig(model=str(folder), max_num_seqs=max(sizes), max_loras=1, **common)
        loaded = random_model(folder, getattr(torch, dtype), torch.device(common["device"]), seed=0)
        engine = make_engine(config, loaded, None)
        run = {
            "tp": 1,
            "engine": "one GPU, as served",
            "base": [decode(engine, b, prompt, steps, []) for b in sizes],
        }
        print(f"one-GPU engine: {run['base']}", flush=True)
        engine.close()
        del engine, loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # its memory back before the tensor-parallel engines size their KV caches
        results["runs"].append(run)
    for tp in args.tp:
        config = EngineConfig(
            model=str(folder), tensor_parallel_size=tp, max_num_seqs=max(sizes), max_loras=max(n_adapters, 1),
            max_cpu_loras=max(2 * n_adapters, 2), fully_sharded_loras=args.fully_sharded_loras, **common,
        )  # fmt: skip
        from engine.parallel.driver import build

        adapters = None
        start = time.perf_counter()
        # TP=1 goes through the parallel path too (a group of one), beside the one-GPU engine as served.
        engine = LLMEngine(config, *build(config, None, weights))
        ready = time.perf_counter() - start
        cfg_full = engine.model.config
        if n_adapters:
            adapters = SeededAdapters(
                work / "adapters", cfg_full, args.lora_rank, QKVO, "qkvo", n_adapters, str(folder)
            )
        run: dict[str, Any] = {
            "tp": tp,
            "engine": "tensor parallel",
            "ready_s": ready,
            "ranks": engine.runner.workers.reports,
            "base": [],
        }
        for b in sizes:
            run["base"].append(decode(engine, b, prompt, steps, []))
            print(f"tp={tp} B={b} base: {run['base'][-1]}", flush=True)
        if adapters is not None:
            loras = [adapters.lora(i) for i in range(n_adapters)]
            b = max(sizes)
            run["qkvo"] = decode(engine, b, prompt, steps, loras)
            print(f"tp={tp} B={b} {n_adapters} q/k/v/o adapters: {run['qkvo']}", flush=True)
        if not args.smoke:
            element = 2
            bandwidth = 4.8e12  # H200 HBM3e nominal; the report states it
            run["roofline_ms_per_gpu"] = roofline_ms(cfg_full, tp, element, bandwidth)
        engine.close()
        results["runs"].append(run)
    (work / "serving_tp.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
