"""Serving benchmark (issue 7): our engine on a Llama-3-8B-shaped bf16 model with random weights, against
the memory roofline, transformers + PEFT, the base model and a cold prefix cache, all in one process.

    PYTHONPATH=. python3 -m benchmarks.serving --out benchmarks/results    # GPU, ~5 minutes on an H100
    PYTHONPATH=. python3 -m benchmarks.serving --smoke --out /tmp/smoke     # CPU demo model, seconds

(-m, not the file path: run as a file, benchmarks/kernels.py would shadow the kernels package.)

Workloads: a decode step vs roofline at B=1..128; b 64 distinct adapters (q/k/v/o, then all seven) vs no
LoRA; c transformers + PEFT on the same mixed batch; d prefix-cache TTFT warm vs cold; e 1,000 adapters,
Zipf popularity, Poisson arrivals vs the base model; f adapter load times; s (not in the default set)
B=64 requests constrained by a 20-field JSON schema vs unconstrained, and the schemas' compile times; q and r
(not in the default set either) FP8 base weights and deterministic mode (benchmarks/serving_fp8.py); v speculative decoding:
verify cost, oracle / n-gram / random-draft tokens/s (benchmarks/serving_spec.py). Writes serving.json and
serving.png under --out and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving_adapters import ALL_SEVEN, FUSED_NAMES, QKVO, SeededAdapters
from benchmarks.serving_e import workload_e
from benchmarks.serving_fp8 import workload_q, workload_r
from benchmarks.serving_hf import workload_c
from benchmarks.serving_model import make_engine, model_config, random_model, write_model_folder
from benchmarks.serving_profile import workload_p
from benchmarks.serving_spec import workload_v
from benchmarks.serving_structured import workload_s
from benchmarks.serving_traffic import workload_d, workload_f
from benchmarks.serving_workloads import Bench, Sizes, workload_a, workload_b, workload_g
from engine.config import EngineConfig

FULL = Sizes(
    batch_sizes=[1, 8, 32, 64, 128], decode_prompt=512, steps=30, warmup=5, b_batch=64,
    c_batch=32, c_prompt=128, c_new=64, c_adapters=8, d_system=2048, d_question=64, d_tenants=4,
    e_adapters=1000, e_requests=400, e_rate=32.0, e_prompt=128, e_new=128,
)  # fmt: skip
SMOKE = Sizes(
    batch_sizes=[1, 2, 4], decode_prompt=8, steps=3, warmup=1, b_batch=4,
    c_batch=4, c_prompt=8, c_new=4, c_adapters=2, d_system=32, d_question=8, d_tenants=2,
    e_adapters=40, e_requests=12, e_rate=200.0, e_prompt=8, e_new=4,
)  # fmt: skip
WORKLOADS = {
    "a": workload_a,
    "b": workload_b,
    "c": workload_c,
    "d": workload_d,
    "e": workload_e,
    "f": workload_f,
    "g": workload_g,  # baseline: the elementwise ops unfused, in plain torch (GPU only)
    "p": workload_p,  # not in the default set: per-kernel GPU time of a decode step
    "q": workload_q,  # not in the default set: FP8 base weights vs bf16 (--memory-fraction 0.4 on a GPU)
    "r": workload_r,  # not in the default set: deterministic mode on vs off (--memory-fraction 0.4 on a GPU)
    "s": workload_s,  # not in the default set: structured outputs (constrained decoding) vs free
    "v": workload_v,  # not in the default set: speculative decoding (verify cost, oracle, n-gram, draft)
}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write; median of 10 after warm-up."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        if i >= 3:
            times.append(seconds)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def adapter_switches(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 19's second-round switches, so one GPU call can ablate each (benchmarks/NOTES.md)."""
    return {
        "adapter_pinned_pool_mb": args.pinned_pool_mb,
        "adapter_batched_copy": not args.no_batched_copy,
        "adapter_eager_slots": not args.no_eager_slots,
    }


def build(args: argparse.Namespace, work: Path) -> Bench:
    if args.smoke:
        from engine.demo import write_demo_model
        from engine.model_loader import load_model

        folder = work / "demo"
        write_demo_model(folder)
        config = EngineConfig(
            model=str(folder), device="cpu", dtype="float32", max_num_seqs=8, max_loras=8, max_cpu_loras=16,
            max_lora_rank=16, num_kv_blocks=256, cuda_graphs=not args.no_graphs,
            adapter_load_processes=args.load_processes, **adapter_switches(args),
        )  # fmt: skip
        loaded = load_model(config)
        sizes, rank, files = SMOKE, 8, (24, 8)
    else:
        folder = write_model_folder(work / f"{args.arch}-llama-3-8b-shaped", model_config(args.arch))
        config = EngineConfig(
            model=str(folder), device="cuda", dtype="bfloat16", max_num_seqs=128, max_loras=128,
            max_cpu_loras=512, max_lora_rank=16, max_model_len=4096, gpu_memory_fraction=args.memory_fraction,
            cuda_graphs=not args.no_graphs, adapter_load_processes=args.load_processes, **adapter_switches(args),
        )  # fmt: skip
        loaded = random_model(folder, torch.bfloat16, torch.device("cuda"), seed=0)
        sizes, rank, files = FULL, 16, (400, 70)
    fused = loaded.config.model_type == "phi3"
    qkvo_t, seven_t = (FUSED_NAMES[QKVO], FUSED_NAMES[ALL_SEVEN]) if fused else (QKVO, ALL_SEVEN)
    qkvo = SeededAdapters(work / "adapters", loaded.config, rank, qkvo_t, "qkvo", files[0], str(folder))
    seven = SeededAdapters(work / "adapters", loaded.config, rank, seven_t, "seven", files[1], str(folder))

    def loader(lora: Any) -> str:
        return (seven if lora.lora_name.startswith("seven-") else qkvo).loader(lora)

    start = time.perf_counter()
    engine = make_engine(config, loaded, loader)
    print(f"engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    bandwidth = copy_bandwidth(loaded.device, 64 << 20 if args.smoke else 2 << 30)
    return Bench(engine=engine, qkvo=qkvo, seven=seven, sizes=sizes, bandwidth=bandwidth)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every workload on the CPU demo model, seconds")
    parser.add_argument("--out", default="benchmarks/results", help="folder for serving.json and serving.png")
    parser.add_argument(
        "--only",
        default="abcdefg",
        help="workloads to run, e.g. 'ab' ('g': decode with the unfused ops, 's': structured outputs)",
    )
    parser.add_argument("--no-graphs", action="store_true", help="EngineConfig(cuda_graphs=False)")
    parser.add_argument(
        "--arch",
        default="llama",
        help="model family on Llama-3-8B shapes: llama, qwen3, gemma2, gemma3, phi3",
    )
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument(
        "--load-processes", type=int, default=None,
        help="EngineConfig.adapter_load_processes (default: 8 on CUDA, 0 on CPU; 0 = loader threads only)",
    )  # fmt: skip
    parser.add_argument(
        "--pinned-pool-mb", type=int, default=None,
        help="EngineConfig.adapter_pinned_pool_mb (MiB; default: the engine's automatic size; 0 = off)",
    )  # fmt: skip
    parser.add_argument("--no-batched-copy", action="store_true", help="per-tensor slot copies")
    parser.add_argument("--no-eager-slots", action="store_true", help="loads wait for a free slot")
    parser.add_argument(
        "--work", default=None, help="scratch folder for the model and adapters (default tmp)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    if args.smoke:
        torch.set_num_threads(1)
    bench = build(args, work)
    device = bench.engine.runner.device
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "smoke": args.smoke,
            "cuda_graphs": bench.engine.runner.graphs is not None,
            "command": "PYTHONPATH=. python3 -m benchmarks.serving "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "model": f"{args.arch}, Llama-3-8B-shaped, random weights"
            if not args.smoke
            else "demo model (CPU)",
            "dtype": str(bench.engine.model.dtype),
            "adapter_load_processes": args.load_processes,
            **adapter_switches(args),
        },
        "copy_bandwidth_GBps": bench.bandwidth / 1e9,
    }
    for name in args.only:
        start = time.perf_counter()
        print(f"--- workload {name}", flush=True)
        try:
            result[name] = WORKLOADS[name](bench)
        except Exception as exc:  # one broken workload must not cost the others their numbers
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["seconds"] = time.perf_counter() - start
        (out / "serving.json").write_text(json.dumps(result, indent=1))
    graphs = bench.engine.runner.graphs
    if graphs is not None:
        result["meta"]["graph_variants"] = sorted(f"T{t}B{b}Q{q}:{m}" for t, b, q, m in graphs.graphs)
        result["meta"]["graph_capture_seconds"] = graphs.capture_seconds
    (out / "serving.json").write_text(json.dumps(result, indent=1))
    bench.engine.close()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    from benchmarks.serving_report import plot, table

    print(table(result), flush=True)
    plot(result, out / "serving.png")
    return result


if __name__ == "__main__":
    main()
