"""The Ray path's overhead against the in-process engine, same machine, same model (docs/scale-out.md).

    python -m tests.ray.measure_overhead [--model DIR] [--device cpu] [--streams 32] [--tokens 64]

Both sides are driven through the app's EngineClient seam (the HTTP layer above it is the same code for
both), the Ray side with ONE engine replica so both have the same compute: time to first token of a lone
request (median of 30), time per output token of a lone stream, and output tokens/s with `--streams`
concurrent streams. Prints one table; not a test (CI never runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from app.config import Settings
from engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


async def one(client: Any, rid: str, ids: list[int], tokens: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    stamps: list[float] = []
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    async for _ in client.generate(rid, ids, params, None, "salt", "tenant"):
        stamps.append(time.perf_counter())
    return stamps[0] - start, stamps


async def measure(client: Any, streams: int, tokens: int) -> dict[str, float]:
    ids = client.encode("hello world, this is a measurement")
    for i in range(5):  # warm-up
        await one(client, f"w{i}", ids, 8)
    ttfts = [(await one(client, f"t{i}", ids, 1))[0] for i in range(30)]
    per_token = []
    for i in range(5):
        _, stamps = await one(client, f"p{i}", ids, tokens)
        per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    start = time.perf_counter()
    await asyncio.gather(*(one(client, f"c{i}", ids, tokens) for i in range(streams)))
    elapsed = time.perf_counter() - start
    return {
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "per_token_ms": statistics.median(per_token) * 1e3,
        "tokens_per_s": streams * tokens / elapsed,
    }


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    # Both engines live on one GPU in turn and the first one's process stays: each takes this share.
    p.add_argument("--gpu-memory-fraction", type=float, default=0.4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lpx-overhead-"))
    model = args.model
    if model is None:
        from engine.demo import write_demo_model

        model = str(write_demo_model(work / "demo"))
    # The replica reserves every core: Ray sets a worker's OMP_NUM_THREADS to its CPUs, and the in-process
    # engine's torch uses all of them.
    settings = Settings(
        data_dir=work,
        model=model,
        device=args.device,
        max_num_seqs=max(args.streams, 8),
        engine_replicas=1,
        engine_replica_cpus=float(os.cpu_count() or 1),
        gpu_memory_fraction=args.gpu_memory_fraction,
    )
    from app.engine_client import LocalEngineClient

    local = LocalEngineClient(settings.engine_config())
    local.start_loading()
    await local.wait_loaded()
    results = {"in-process": await measure(local, args.streams, args.tokens)}
    await local.shutdown()

    import ray

    from app.scaleout.client import RayEngineClient

    os.environ["PYTHONPATH"] = str(ROOT)
    ray.init(include_dashboard=False, namespace="loraplex", log_to_driver=False)
    remote = RayEngineClient(Settings(**{**settings.only(*_FIELDS), "ray": True}))
    remote.start_loading()
    await remote.wait_loaded()
    results["ray (1 replica)"] = await measure(remote, args.streams, args.tokens)
    await remote.shutdown()
    ray.shutdown()

    base, ray_r = results["in-process"], results["ray (1 replica)"]
    print(f"| path | TTFT ms | per token ms | tokens/s at {args.streams} streams |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ttft_ms']:.2f} | {r['per_token_ms']:.2f} | {r['tokens_per_s']:.0f} |")
    print(
        f"| difference | +{ray_r['ttft_ms'] - base['ttft_ms']:.2f} | "
        f"+{ray_r['per_token_ms'] - base['per_token_ms']:.2f} | "
        f"{100 * (ray_r['tokens_per_s'] / base['tokens_per_s'] - 1):+.1f}% |"
    )


_FIELDS = (
    "data_dir",
    "model",
    "device",
    "max_num_seqs",
    "engine_replicas",
    "engine_replica_cpus",
    "gpu_memory_fraction",
)

if __name__ == "__main__":
    asyncio.run(main())
