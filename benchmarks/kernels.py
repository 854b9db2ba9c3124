"""GPU benchmark of the Triton kernels against torch baselines and the measured roofline.

    python benchmarks/kernels.py                 # full tables (about 3 minutes on an H100)
    python benchmarks/kernels.py --sweep         # also try LoRA launch configurations on the key shapes
    python benchmarks/kernels.py --sweep-attention   # and decode-attention ones
    python benchmarks/kernels.py --out DIR       # write the tables and a JSON of every number there
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry   # CPU: run every code path once, tiny shapes

Timing: each variant is captured in a CUDA graph over several weight sets ("layers", enough to overflow
L2) and the graph's replays are timed with triton.testing.do_bench (CUDA events, median, after warm-up).
The roofline comes from a measured device-to-device copy (bytes read + written) and a measured bf16
matrix product on random data, both in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.attention import paged_attention, paged_attention_ref
from kernels.lora import (
    LoRALaunch,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    make_lora_meta,
)

# Llama-3-8B
HIDDEN, INTER, HQ, HKV, HEAD_DIM = 4096, 14336, 32, 8, 128
PROJECTIONS = {  # name: (input width, output widths of the slices fused in one launch)
    "qkv": (HIDDEN, [HQ * HEAD_DIM, HKV * HEAD_DIM, HKV * HEAD_DIM]),
    "o": (HQ * HEAD_DIM, [HIDDEN]),
    "gate_up": (HIDDEN, [INTER, INTER]),
    "down": (INTER, [HIDDEN]),
}
L2_FLUSH_BYTES = 200e6  # rotate weight sets until this many bytes are touched (H100/H200 L2: 50/60 MB)


@dataclass
class Env:
    device: str
    dry: bool
    copy_gbs: float = 0.0
    matmul_tflops: float = 0.0
    rows: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ timing


def bench(env: Env, make_step: Callable[[int], Callable[[], None]], sets: int) -> float:
    """Microseconds per call of one step, over `sets` rotating inputs, graph-captured on the GPU."""
    steps = [make_step(i) for i in range(sets)]
    for s in steps:  # compile and allocate outside the capture
        s()
    if env.dry:
        t0 = time.perf_counter()
        for s in steps:
            s()
        return (time.perf_counter() - t0) * 1e6 / sets
    import triton.testing

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in steps:
            s()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms * 1e3 / sets


def measure_roofline(env: Env) -> None:
    if env.dry:
        env.copy_gbs, env.matmul_tflops = 1.0, 1.0
        return
    import triton.testing

    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    env.copy_gbs = 2 * src.numel() * 4 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    env.matmul_tflops = 2 * 8192**3 / ms / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- LoRA


@dataclass
class LoRACase:
    proj: str
    rank: int
    tokens: int
    adapters: int  # distinct adapters in the batch (tokens spread evenly over them)


def lora_bytes_flops(case: LoRACase) -> tuple[int, int]:
    """Fewest bytes the layer must move: every used adapter's A and B once, x once, y read + written."""
    hidden, widths = PROJECTIONS[case.proj]
    used, out = min(case.adapters, case.tokens), sum(widths)
    weights = used * case.rank * (hidden * len(widths) + out) * 2
    activations = case.tokens * (hidden + 2 * out) * 2
    flops = 2 * case.tokens * case.rank * (hidden * len(widths) + out)
    return weights + activations, flops


class LoRAInputs:
    """One layer's weights for `case` (one 'set' of the rotation), plus the step's shared tensors."""

    def __init__(self, case: LoRACase, device: str, dtype: torch.dtype, slots: torch.Tensor) -> None:
        hidden, widths = PROJECTIONS[case.proj]
        num_slots = max(case.adapters, 1)
        self.x = torch.randn(case.tokens, hidden, device=device, dtype=dtype)
        self.a = [
            torch.randn(num_slots, case.rank, hidden, device=device, dtype=dtype) * hidden**-0.5
            for _ in widths
        ]
        self.b = [torch.randn(num_slots, w, case.rank, device=device, dtype=dtype) for w in widths]
        self.y = torch.randn(case.tokens, sum(widths), device=device, dtype=dtype)
        self.buf = torch.empty(len(widths), case.tokens, case.rank, device=device)
        self.scales = torch.rand(num_slots, device=device) + 0.5
        self.scale_list = self.scales.tolist()  # host copies: a graph capture cannot read device scalars
        self.meta = make_lora_meta(slots, num_slots)
        self.slots = slots
        # Baselines' preferred layouts, built once like a real engine would: A of all slices stacked.
        self.a_cat = torch.cat(self.a, dim=1)  # [S, N*R, H]
        self.groups = [(s, (slots == s).nonzero().flatten()) for s in range(num_slots)]
        self.groups = [(s, idx) for s, idx in self.groups if idx.numel()]

    def triton(self, launch_s: LoRALaunch | None = None, launch_e: LoRALaunch | None = None) -> None:
        lora_shrink(self.x, self.a, self.meta, self.buf, launch=launch_s)
        lora_expand(self.buf, self.b, self.meta, self.y, self.scales, launch=launch_e)

    def loop_baseline(self) -> None:
        """One adapter at a time: gather its tokens, two matmuls per slice, scatter-add back."""
        rank = self.buf.shape[2]
        for s, idx in self.groups:
            h = self.x[idx] @ self.a_cat[s].T  # [t, N*R]
            deltas = [h[:, n * rank : (n + 1) * rank] @ b[s].T for n, b in enumerate(self.b)]
            self.y.index_add_(0, idx, torch.cat(deltas, dim=1), alpha=self.scale_list[s])

    def gather_baseline(self) -> None:
        """Per-token weights gathered into a batch, then batched matmuls (the 'bgmv via bmm' way)."""
        rank = self.buf.shape[2]
        h = torch.bmm(self.a_cat[self.slots], self.x[:, :, None])  # [T, N*R, 1]
        deltas = [torch.bmm(b[self.slots], h[:, n * rank : (n + 1) * rank]) for n, b in enumerate(self.b)]
        self.y += (torch.cat(deltas, dim=1)[:, :, 0] * self.scales[self.slots][:, None]).to(self.y.dtype)


def lora_slots(case: LoRACase, device: str) -> torch.Tensor:
    slots = torch.arange(case.tokens) % max(case.adapters, 1)
    return slots[torch.randperm(case.tokens)].to(torch.int32).to(device)


def lora_sets(case: LoRACase) -> int:
    weight_bytes = lora_bytes_flops(case)[0]
    return max(1, min(8, math.ceil(L2_FLUSH_BYTES / weight_bytes)))


def check_lora(inp: LoRAInputs) -> float:
    y0 = inp.y.clone()
    inp.triton()
    got = inp.y - y0
    inp.y.copy_(y0)
    want_buf = torch.empty_like(inp.buf)
    lora_shrink_ref(inp.x, inp.a, inp.meta, want_buf)
    lora_expand_ref(want_buf, inp.b, inp.meta, inp.y, inp.scales)
    want = inp.y - y0
    inp.y.copy_(y0)
    return rel_err(got.float(), want.float())


def run_lora_case(env: Env, case: LoRACase, dtype: torch.dtype, baselines: bool = True) -> dict:
    slots = lora_slots(case, env.device)
    sets = 2 if env.dry else lora_sets(case)
    inputs = [LoRAInputs(case, env.device, dtype, slots) for _ in range(sets)]
    err = check_lora(inputs[0])
    row: dict = {**asdict(case), "sets": sets, "rel_err": err}
    row["triton_us"] = bench(env, lambda i: inputs[i].triton, sets)
    if baselines:
        row["loop_us"] = bench(env, lambda i: inputs[i].loop_baseline, sets)
        row["gather_us"] = bench(env, lambda i: inputs[i].gather_baseline, sets)
    hidden, widths = PROJECTIONS[case.proj]
    base_w = [torch.randn(sum(widths), hidden, device=env.device, dtype=dtype) for _ in range(sets)]
    row["base_gemm_us"] = bench(env, lambda i: lambda: inputs[i].x @ base_w[i].T, sets)
    nbytes, flops = lora_bytes_flops(case)
    row["bytes"], row["flops"] = nbytes, flops
    floor_us = max(nbytes / (env.copy_gbs * 1e3), flops / (env.matmul_tflops * 1e6))
    row["roofline_us"] = floor_us
    row["pct_roofline"] = 100 * floor_us / row["triton_us"]
    row["gbs"] = nbytes / (row["triton_us"] * 1e3)
    row["tflops"] = flops / (row["triton_us"] * 1e6)
    if baselines:
        row["speedup_vs_best_torch"] = min(row["loop_us"], row["gather_us"]) / row["triton_us"]
    return row


def lora_table(env: Env, dtype: torch.dtype, quick: bool) -> list[dict]:
    ranks, tokens, adapters = (
        ([16], [1, 64], [1, 64]) if quick else ([8, 16, 64], [1, 16, 64, 256, 2048], [1, 8, 64])
    )
    rows = []
    for rank in ranks:
        for t in tokens:
            for a in adapters:
                if a > t and a != 1:
                    continue  # more distinct adapters than tokens is the same case as a == t
                rows.append(run_lora_case(env, LoRACase("qkv", rank, t, a), dtype))
                print_row(rows[-1], LORA_COLUMNS)
    for proj in ("o", "gate_up", "down"):
        rows.append(run_lora_case(env, LoRACase(proj, 16, 64, 64), dtype))
        print_row(rows[-1], LORA_COLUMNS)
    return rows


def shrink_step(inputs: list[LoRAInputs], cfg: LoRALaunch | None) -> Callable[[int], Callable[[], None]]:
    def make(i: int) -> Callable[[], None]:
        inp = inputs[i]
        return lambda: lora_shrink(inp.x, inp.a, inp.meta, inp.buf, launch=cfg)

    return make


def expand_step(inputs: list[LoRAInputs], cfg: LoRALaunch | None) -> Callable[[int], Callable[[], None]]:
    def make(i: int) -> Callable[[], None]:
        inp = inputs[i]
        return lambda: lora_expand(inp.buf, inp.b, inp.meta, inp.y, inp.scales, launch=cfg)

    return make


def sweep_configs(kernel: str, case: LoRACase, dry: bool) -> list[LoRALaunch]:
    target = case.tokens == 64 and case.adapters == 64 and case.rank == 16
    if kernel == "shrink" and target:
        cfgs = [
            LoRALaunch(block_m=4, block_k=bk, split_k=split, num_stages=stages)
            for bk in (256, 512) for split in (1, 2) for stages in (3, 4)
        ]  # fmt: skip
    elif kernel == "shrink":
        cfgs = [LoRALaunch(split_k=split) for split in (1, 2, 4, 8)]
    else:
        cfgs = [
            LoRALaunch(block_m=bm, block_n=bn, tiles_per_program=tiles)
            for bm in ((1, 4) if target else (None,))
            for bn in (128, 256)
            for tiles in (1, 2, 4, 8)
        ]
    return cfgs[:1] if dry else cfgs


def lora_sweep(env: Env, dtype: torch.dtype) -> list[dict]:
    """Shrink and expand alone, over launch configurations, on the target shape and two others."""
    out = []
    for case in (LoRACase("qkv", 16, 64, 64), LoRACase("qkv", 16, 2048, 8), LoRACase("qkv", 64, 64, 64)):
        slots = lora_slots(case, env.device)
        sets = 2 if env.dry else lora_sets(case)
        inputs = [LoRAInputs(case, env.device, dtype, slots) for _ in range(sets)]
        for kernel, step in (("shrink", shrink_step), ("expand", expand_step)):
            default = bench(env, step(inputs, None), sets)
            rows = []
            for cfg in sweep_configs(kernel, case, env.dry):
                try:
                    us = bench(env, step(inputs, cfg), sets)
                except Exception as exc:  # a configuration past the shared-memory limit, say
                    print(f"  skipped {cfg}: {type(exc).__name__}", flush=True)
                    continue
                rows.append(
                    {**asdict(case), "kernel": kernel, **asdict(cfg), "us": us, "default_us": default}
                )
            out.extend(rows)
            best = min(rows, key=lambda r: r["us"])
            print(f"sweep {kernel:6s} {case}: default {default:8.1f} us, best {best['us']:8.1f} us with "
                  f"block_m={best['block_m']} block_k={best['block_k']} block_n={best['block_n']} "
                  f"split_k={best['split_k']} tiles={best['tiles_per_program']} warps={best['num_warps']} "
                  f"stages={best['num_stages']}",
                  flush=True)  # fmt: skip
    return out


# -------------------------------------------------------------------------------------- attention


class DecodeInputs:
    def __init__(self, batch: int, ctx: int, device: str, dtype: torch.dtype, block_size: int = 16) -> None:
        per_seq = ctx // block_size
        self.k_cache = torch.randn(batch * per_seq, block_size, HKV, HEAD_DIM, device=device, dtype=dtype)
        self.v_cache = torch.randn_like(self.k_cache)
        perm = torch.randperm(batch * per_seq, device=device).to(torch.int32)
        self.tables = perm.view(batch, per_seq).contiguous()  # scattered pages, like a used cache
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, HQ, HEAD_DIM, device=device, dtype=dtype)
        self.scale = HEAD_DIM**-0.5

    def triton(self, **kw) -> torch.Tensor:
        return paged_attention(
            self.q, self.k_cache, self.v_cache, self.tables, self.seq_lens, self.starts, self.scale, **kw
        )

    def torch_baseline(self) -> torch.Tensor:
        """Gather each sequence's pages into a dense [B, Hkv, ctx, D] and call SDPA (GQA by expansion)."""
        batch = self.tables.shape[0]
        k = self.k_cache[self.tables.long()].view(batch, -1, HKV, HEAD_DIM).transpose(1, 2)
        v = self.v_cache[self.tables.long()].view(batch, -1, HKV, HEAD_DIM).transpose(1, 2)
        q = self.q.view(batch, HQ, 1, HEAD_DIM)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)
        return out.view(batch, HQ, HEAD_DIM)


def attention_configs(batch: int, dry: bool) -> list[dict]:
    splits = {1: (None, 8, 16, 32), 32: (None, 2, 4)}.get(batch, (None,))
    configs = [
        {"block_n": block_n, "num_warps": warps, "num_stages": stages, "num_splits": split}
        for block_n in (64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
        for split in splits
    ]
    return configs[:2] if dry else configs


def attention_table(env: Env, dtype: torch.dtype, quick: bool, sweep: bool) -> list[dict]:
    rows = []
    batches, ctxs = ([1, 128], [4096]) if quick else ([1, 32, 128], [512, 4096])
    if env.dry:
        batches, ctxs = [2], [64]
    for batch in batches:
        for ctx in ctxs:
            inp = DecodeInputs(batch, ctx, env.device, dtype)
            want = paged_attention_ref(
                inp.q, inp.k_cache, inp.v_cache, inp.tables, inp.seq_lens, inp.starts, inp.scale
            )
            nbytes = 2 * batch * ctx * HKV * HEAD_DIM * 2 + 2 * batch * HQ * HEAD_DIM * 2
            sets = 1 if env.dry else max(1, min(8, math.ceil(L2_FLUSH_BYTES / nbytes)))
            many = [inp] + [DecodeInputs(batch, ctx, env.device, dtype) for _ in range(sets - 1)]
            row = {
                "batch": batch,
                "ctx": ctx,
                "bytes": nbytes,
                "sets": sets,
                "rel_err": rel_err(inp.triton(), want),
            }
            row["triton_us"] = bench(env, lambda i, many=many: many[i].triton, sets)
            row["torch_us"] = bench(env, lambda i, many=many: many[i].torch_baseline, sets)
            row["gbs"] = nbytes / (row["triton_us"] * 1e3)
            row["pct_copy"] = 100 * row["gbs"] / env.copy_gbs
            if sweep and (ctx == max(ctxs)):
                best = None
                for kw in attention_configs(batch, env.dry):
                    us = bench(env, lambda i, kw=kw, many=many: lambda: many[i].triton(**kw), sets)
                    if best is None or us < best[0]:
                        best = (us, kw)
                assert best is not None
                row["sweep_best_us"], row["sweep_best"] = best
            rows.append(row)
            print_row(row, ATTN_COLUMNS)
    return rows


# ---------------------------------------------------------------------------------------- output

LORA_COLUMNS = [
    ("proj", "{:>7}"), ("rank", "{:>4}"), ("tokens", "{:>6}"), ("adapters", "{:>8}"), ("triton_us", "{:>9.1f}"),
    ("loop_us", "{:>9.1f}"), ("gather_us", "{:>9.1f}"), ("base_gemm_us", "{:>12.1f}"), ("speedup_vs_best_torch", "{:>21.2f}"),
    ("gbs", "{:>7.0f}"), ("tflops", "{:>6.1f}"), ("roofline_us", "{:>11.1f}"), ("pct_roofline", "{:>12.0f}"), ("rel_err", "{:>8.1e}"),
]  # fmt: skip
ATTN_COLUMNS = [
    ("batch", "{:>5}"), ("ctx", "{:>5}"), ("triton_us", "{:>9.1f}"), ("torch_us", "{:>9.1f}"), ("gbs", "{:>7.0f}"),
    ("pct_copy", "{:>8.0f}"), ("rel_err", "{:>8.1e}"), ("sweep_best_us", "{:>13.1f}"), ("sweep_best", "{}"),
]  # fmt: skip


def print_row(row: dict, columns: list[tuple[str, str]]) -> None:
    cells = []
    for name, fmt in columns:
        width = max(len(name), 5)
        cells.append(fmt.format(row[name]).rjust(width) if name in row else "-".rjust(width))
    print(" ".join(cells), flush=True)


def header(columns: list[tuple[str, str]]) -> str:
    return " ".join(name.rjust(max(len(name), 5)) for name, _ in columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rows only")
    parser.add_argument("--sweep", action="store_true", help="try LoRA launch configurations on key shapes")
    parser.add_argument("--sweep-attention", action="store_true", help="the same for decode attention")
    parser.add_argument("--dry", action="store_true", help="CPU + TRITON_INTERPRET=1: exercise every path")
    parser.add_argument("--out", type=Path, help="folder for tables and JSON")
    args = parser.parse_args()
    if args.dry:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--dry needs TRITON_INTERPRET=1"
        global HIDDEN, INTER, HQ, HKV, HEAD_DIM, PROJECTIONS
        HIDDEN, INTER, HQ, HKV, HEAD_DIM = 32, 48, 4, 2, 16
        PROJECTIONS = {
            "qkv": (32, [64, 32, 32]),
            "o": (64, [32]),
            "gate_up": (32, [48, 48]),
            "down": (48, [32]),
        }
    env = Env(device="cpu" if args.dry else "cuda", dry=args.dry)
    dtype = torch.float32 if args.dry else torch.bfloat16
    torch.manual_seed(0)
    measure_roofline(env)
    name = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; copy {env.copy_gbs:.0f} GB/s (read+write); "
          f"bf16 matmul {env.matmul_tflops:.0f} TFLOP/s; {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("\nmulti-LoRA shrink+expand, bf16, Llama-3-8B shapes (times per layer, microseconds)")
    print(header(LORA_COLUMNS))
    quick = args.quick or args.dry
    results = {"device": name, "copy_gbs": env.copy_gbs, "matmul_tflops": env.matmul_tflops}
    save = (
        (lambda: (args.out / "kernels.json").write_text(json.dumps(results, indent=1, default=str)))
        if args.out
        else (lambda: None)
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        results["lora_sweep"] = lora_sweep(env, dtype)
        save()
    results["lora"] = lora_table(env, dtype, quick)
    save()
    print("\npaged decode attention, bf16, 32 query / 8 KV heads, head dim 128, blocks of 16")
    print(header(ATTN_COLUMNS))
    results["attention"] = attention_table(env, dtype, quick, args.sweep_attention)
    save()


if __name__ == "__main__":
    main()
