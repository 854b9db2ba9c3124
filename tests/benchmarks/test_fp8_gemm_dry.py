"""benchmarks/fp8_gemm.py --dry: every variant of the per-projection FP8 table runs on the CPU, and the
FP8 product it times is the bf16 product within FP8's rounding (the GPU run is the measurement)."""

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
        assert 0 < r["fp8_rel_err"] < 0.1, r  # the FP8 product is the bf16 one, rounded
