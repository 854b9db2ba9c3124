"""The decode attention kernel of layers without a window or soft-cap, compiled for sm_90 on a CPU, next
to the kernel before windows existed (a file given on the command line): their SASS instruction counts
and registers. Run as a script (compiled-mode Triton, no TRITON_INTERPRET); prints one JSON line."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels import attention
from tests.kernels.sm90_compile import CUOBJDUMP, Recorder, signature


def sass_of(module, **window) -> dict:
    launches: list = []
    original = module._attention_kernel
    module._attention_kernel = Recorder(original, "_attention_kernel", launches)
    bf16, hq, hkv, d, bs, batch, ctx = torch.bfloat16, 32, 8, 128, 16, 64, 1000
    cache = torch.randn(batch * (-(-ctx // bs)), bs, hkv, d, dtype=bf16)
    tables = torch.zeros(batch, -(-ctx // bs), dtype=torch.int32)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    q = torch.randn(batch, hq, d, dtype=bf16)
    seq = torch.full((batch,), ctx, dtype=torch.int32)
    try:
        module.paged_attention(q, cache, cache, tables, seq, starts, 0.1, num_splits=1, **window)
    finally:
        module._attention_kernel = original
    kernel, _, _, args, kwargs = launches[0]
    sig, consts, attrs, options = signature(kernel, args, kwargs)
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
        target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
        options=options,
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    body = re.findall(r"/\*[0-9a-f]{4}\*/\s+([A-Z][A-Z0-9_.]*)", sass)
    loop = len(re.findall(r"\b(?:LDG|HGMMA|HMMA|MUFU)[.\w]*", sass))
    regs = re.search(r"REG:(\d+)", res)
    return {
        "instructions": len(body),
        "mem_mma_mufu": loop,
        "registers": int(regs.group(1)) if regs else None,
        "opcodes": " ".join(body),
    }


def main() -> None:
    spec = importlib.util.spec_from_file_location("attention_before", sys.argv[1])
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    out = {
        "before": sass_of(before),
        "no_window": sass_of(attention),
        "window": sass_of(attention, window=4096),
        "softcap": sass_of(attention, softcap=50.0),
    }
    same = out["before"].pop("opcodes") == out["no_window"]["opcodes"]
    for v in out.values():
        v.pop("opcodes", None)
    print(json.dumps({**out, "no_window_same_opcodes_as_before": same}), flush=True)


if __name__ == "__main__":
    main()
