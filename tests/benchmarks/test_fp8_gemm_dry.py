"""benchmarks/fp8_gemm.py --dry: every variant of the per-projection FP8 table runs on the CPU, with its
roofline (the GPU run is the measurement; this keeps the code from rotting)."""

from __future__ import annotations

import json
from pathlib import Path


def test_fp8_gemm_table_runs(tmp_path: Path) -> None:
    from benchmarks.fp8_gemm import SHAPES, TOKENS, main

    main(["--dry", "--out", str(tmp_path / "fp8.json")])
    rows = json.loads((tmp_path / "fp8.json").read_text())["rows"]
    assert [(r["proj"], r["tokens"]) for r in rows] == [(p, t) for t in TOKENS for p in SHAPES]
    for r in rows:
        for key in ("bf16", "fp8", "fp8_mm", "quantize", "dequantize"):
            assert r[f"{key}_us"] > 0, (key, r)
        assert r["roofline_fp8_us"] * 2 == r["roofline_bf16_us"]
