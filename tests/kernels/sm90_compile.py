"""Compile every kernel launch the wrappers make at Llama-3-8B shapes for an H100 (sm_90), on a CPU.

Run as a script (compiled-mode Triton: without TRITON_INTERPRET). The wrappers are called on CPU tensors
with each `_kernel[grid](...)` replaced by a recorder; every recorded launch is then compiled ahead of
time with the argument types and 16-divisibility a JIT launch would see, and its SASS is summarised:
the memory instructions (vector width), matrix instructions and local-memory spills. Prints one JSON
line per launch. Used by test_compile_sm90.py and handy when tuning: no GPU needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import attention, lora

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                   torch.int64: "i64"}  # fmt: skip


class Recorder:
    def __init__(self, kernel, name: str, launches: list) -> None:
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, self.name, grid, args, kwargs))

        return launch


def signature(kernel, args, kwargs):
    names = kernel.arg_names
    consts = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TORCH_TO_TRITON[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            sig[name], aligned = "i1", False
        elif isinstance(value, int):
            if value == 1:  # what the JIT does with a 1: a compile-time constant
                consts[name] = 1
                continue
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        else:
            sig[name], aligned = "fp32", False
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    return sig, consts, attrs, options


def compile_launch(kernel, args, kwargs) -> dict:
    sig, consts, attrs, options = signature(kernel, args, kwargs)
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    ops: dict[str, int] = {}
    for op in re.findall(r"\b((?:LDG|STG|LDGSTS|LDL|STL|ATOMG|RED|HMMA|HGMMA)[\.\w]*)", sass):
        ops[op] = ops.get(op, 0) + 1
    regs = re.search(r"REG:(\d+)", res)
    return {"ops": ops, "registers": int(regs.group(1)) if regs else None, "shared": compiled.metadata.shared}


def record_launches() -> list:
    launches: list = []
    for module, name in ((lora, "_shrink_kernel"), (lora, "_expand_kernel"), (attention, "_attention_kernel"),
                         (attention, "_merge_splits_kernel"), (attention, "_write_kv_kernel")):  # fmt: skip
        setattr(module, name, Recorder(getattr(module, name), name, launches))
    bf16 = torch.bfloat16
    hidden, widths = 4096, [4096, 1024, 1024]
    for tokens, adapters, rank in ((64, 64, 16), (2048, 4, 64), (64, 8, 8)):
        slots = (torch.arange(tokens) % adapters).to(torch.int32)
        meta = lora.make_lora_meta(slots, adapters)
        x = torch.randn(tokens, hidden, dtype=bf16)
        a = [torch.randn(adapters, rank, hidden, dtype=bf16) for _ in widths]
        b = [torch.randn(adapters, w, rank, dtype=bf16) for w in widths]
        buf = torch.empty(len(widths), tokens, rank)
        ranks = torch.full((adapters,), rank, dtype=torch.int32)
        lora.lora_shrink(x, a, meta, buf, ranks)
        lora.lora_expand(
            buf, b, meta, torch.randn(tokens, sum(widths), dtype=bf16), torch.ones(adapters), ranks
        )
    hq, hkv, d, bs = 32, 8, 128, 16
    for q_lens, splits in (([1] * 64, None), ([1], 8), ([300, 7], None)):
        ctx = [max(q, 1000) for q in q_lens]
        blocks = sum(-(-c // bs) for c in ctx)
        cache = torch.randn(blocks, bs, hkv, d, dtype=bf16)
        tables = torch.zeros(len(q_lens), -(-max(ctx) // bs), dtype=torch.int32)
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(sum(q_lens), hq, d, dtype=bf16)
        attention.paged_attention(q, cache, cache, tables, torch.tensor(ctx, dtype=torch.int32), starts, 0.1,
                                  num_splits=splits)  # fmt: skip
        kv = torch.randn(sum(q_lens), hkv, d, dtype=bf16)
        attention.write_kv(kv, kv, cache, cache, torch.arange(sum(q_lens)))
    return launches


def main() -> None:
    seen = set()
    for kernel, name, _grid, args, kwargs in record_launches():
        key = (name, json.dumps(kwargs, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        info = compile_launch(kernel, args, kwargs)
        print(
            json.dumps({"kernel": name, "config": {k: str(v) for k, v in kwargs.items()}, **info}), flush=True
        )


if __name__ == "__main__":
    main()
