"""What limits FP8 decode at small batches (issue 20): one Llama-3-8B projection at a time, T = 1 / 32 / 128
tokens, each variant captured in a CUDA graph over enough weight sets to overflow L2 (as a model's layers
do), replays timed by benchmarks/kernels.py's `bench` (triton's do_bench, median), per projection:

- bf16: F.linear on the bf16 weight (cuBLAS), the engine's default;
- fp8: the engine's FP8 product (kernels/fp8.py's fp8_linear: per-token activation quantization, then
  torch._scaled_mm with row-wise scales);
- fp8_mm: torch._scaled_mm alone (activations already quantized);
- quantize: the activation quantization alone;
- dequantize: the FP8 weight dequantized into bf16, then F.linear (the CPU path; memory-bound twice).

Each row has the roofline of its bytes (bf16 weight: 2 bytes a weight, FP8: 1) at the copy bandwidth
measured in the same run (a 2 GiB device-to-device copy, bytes read + written).

    PYTHONPATH=. python3 -m benchmarks.fp8_gemm --out $OUT/fp8_gemm.json    # GPU (H100 / H200)
    PYTHONPATH=. python3 -m benchmarks.fp8_gemm --dry                        # CPU: every path once, tiny
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.kernels import Env, bench
from benchmarks.serving import copy_bandwidth
from kernels import fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = (1, 32, 128)
L2_OVERFLOW_BYTES = 256 << 20  # weight bytes touched per replay: several times an H200's 50 MB L2


def projection(name: str, out_f: int, in_f: int, tokens: int, env: Env, bandwidth: float) -> dict:
    device = torch.device(env.device)
    sets = 1 if env.dry else max(2, -(-L2_OVERFLOW_BYTES // (out_f * in_f)))  # FP8 bytes; bf16 is twice
    gen = torch.Generator(device=device).manual_seed(0)
    w = [
        torch.randn(out_f, in_f, device=device, generator=gen).div_(in_f**0.5).bfloat16() for _ in range(sets)
    ]
    q = [fp8.quantize_rows(x.float()) for x in w]
    w8 = [a for a, _ in q]
    rows = [s[None, :].contiguous() for _, s in q]  # [1, O] float32, fp8_linear's row-wise layout
    cols = [s for _, s in q]
    x = torch.randn(tokens, in_f, device=device, generator=gen).bfloat16()
    xq, x_scale = fp8.quantize_tokens(x)
    variants: dict[str, Callable[[int], Any]] = {
        "bf16": lambda i: F.linear(x, w[i]),
        "fp8": lambda i: fp8.fp8_linear(x, w8[i], rows[i], None, None),
        "fp8_mm": lambda i: torch._scaled_mm(
            xq, w8[i].t(), scale_a=x_scale, scale_b=rows[i], out_dtype=torch.bfloat16
        ),
        "quantize": lambda i: fp8.quantize_tokens(x),
        "dequantize": lambda i: F.linear(x, fp8.dequantize(w8[i], cols[i], torch.bfloat16)),
    }
    row: dict[str, Any] = {"proj": name, "out": out_f, "in": in_f, "tokens": tokens}
    # The FP8 product against the bf16 one on the same weights (its quantization error, ~2e-2).
    want = F.linear(x.float(), w[0].float())
    row["fp8_rel_err"] = float((variants["fp8"](0).float() - want).norm() / want.norm())
    for key, one in variants.items():
        try:
            row[f"{key}_us"] = bench(env, lambda i, one=one: functools.partial(one, i), sets)
        except RuntimeError as exc:  # e.g. no row-wise _scaled_mm in this build
            row[f"{key}_us"] = None
            row[f"{key}_error"] = str(exc)[:200]
    weights = out_f * in_f
    row["roofline_bf16_us"] = 2 * weights / bandwidth * 1e6
    row["roofline_fp8_us"] = weights / bandwidth * 1e6
    for key, roof in (
        ("bf16", "roofline_bf16_us"),
        ("fp8", "roofline_fp8_us"),
        ("fp8_mm", "roofline_fp8_us"),
    ):
        if row.get(f"{key}_us"):
            row[f"{key}_over_roofline"] = row[f"{key}_us"] / row[roof]
    if row.get("fp8_us") and row.get("bf16_us"):
        row["fp8_speedup"] = row["bf16_us"] / row["fp8_us"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: every path once")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    env = Env("cuda" if cuda else "cpu", dry=not cuda)
    shapes = SHAPES if cuda else {k: (o // 64, i // 64) for k, (o, i) in SHAPES.items()}
    bandwidth = copy_bandwidth(torch.device(env.device), 2 << 30 if cuda else 64 << 20)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"fp8_gemm  {card}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  copy {bandwidth / 1e9:.0f} GB/s"
    )
    rows = []
    for tokens in TOKENS:
        for name, (out_f, in_f) in shapes.items():
            row = projection(name, out_f, in_f, tokens, env, bandwidth)
            rows.append(row)
            print(
                "  ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()
                    if not k.endswith("_error")
                ),
                flush=True,
            )
    result = {"card": card, "bandwidth": bandwidth, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
