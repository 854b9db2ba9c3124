"""benchmarks/serving.py --only qr on the CPU demo model: the FP8 and deterministic workloads run and
report what they promise (the GPU run is the measurement; this keeps the code from rotting)."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks.smoke import run_smoke


def test_fp8_and_deterministic_workloads_run(tmp_path: Path) -> None:
    result = run_smoke(tmp_path, "qr")
    q, r = result["q"], result["r"]
    assert "error" not in q, q
    assert "error" not in r, r
    assert set(q["fp8"]) == set(q["bf16"]) == {"1", "2", "4"}
    # One byte per projection weight: the FP8 model is smaller, and so is its roofline.
    assert q["weight_bytes"]["fp8"] < q["weight_bytes"]["bf16"]
    assert q["fp8"]["1"]["bytes_per_step"] < q["bf16"]["1"]["bytes_per_step"]
    # CPU: the dequantize path, equal to the dequantized model; the quantization itself moves the logits.
    assert q["logits"]["fp8_gemm_layers"] == 0 and q["logits"]["rel_err_vs_dequantized_bf16"] == 0.0
    assert 0.0 < q["logits"]["rel_err_vs_original_bf16"] < 0.5
    assert q["fp8_qkvo"]["adapters"] == q["fp8_base"]["batch"]
    assert all(r["identical_deterministic"].values()), r["identical_deterministic"]
    assert r["on"]["base"]["tokens_per_s"] > 0
