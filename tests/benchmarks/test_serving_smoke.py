"""benchmarks/serving.py --smoke: every workload runs on the CPU demo model and reports sane numbers, so
the GPU benchmark cannot rot between device runs."""

from __future__ import annotations

import math
import sys

import pytest

from tests.benchmarks.smoke import run_smoke


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("serving")
    result = run_smoke(out)
    assert (out / "serving.png").stat().st_size > 10_000
    return result


def test_every_workload_ran(result: dict) -> None:
    for name in "abcdef":
        assert name in result and "error" not in result[name], result.get(name)
    assert result["meta"]["smoke"] is True and _positive(result["copy_bandwidth_GBps"])


def test_decode_rows_against_roofline(result: dict) -> None:
    rows = result["a"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2, 4]
    for r in rows:
        for key in ("forward_ms", "step_ms", "tokens_per_s", "roofline_ms", "bytes_per_step"):
            assert _positive(r[key]), (key, r)
        # A step cannot beat the bytes it must move, and the step includes the forward.
        assert r["forward_over_roofline"] > 1.0 and r["step_ms"] >= r["forward_ms"]
        assert r["mean_context"] > 8


def test_adapters_cost_bytes_and_outputs_match_the_oracle(result: dict) -> None:
    b = result["b"]
    assert b["base"]["adapters"] == 0 and b["qkvo"]["adapters"] == 4 and b["all_seven"]["adapters"] == 4
    assert b["all_seven"]["bytes_per_step"] > b["qkvo"]["bytes_per_step"] > b["base"]["bytes_per_step"]
    assert _positive(b["qkvo_over_base_throughput"])
    c = result["c"]
    for key in ("hf_base_tokens_per_s", "hf_mixed_tokens_per_s", "ours_mixed_tokens_per_s", "speedup_mixed"):
        assert _positive(c[key]), key
    # float32 on the CPU: our engine equals transformers + PEFT on the same mixed batch.
    assert c["check_prefill_logits_rel_err"] < 1e-4
    assert c["check_greedy_tokens_equal"] == 1.0
    assert c["check_async_tokens_equal_sync"] is True and c["check_async_vs_sync_logits_rel_err"] == 0.0


def test_prefix_cache_and_traffic(result: dict) -> None:
    d = result["d"]
    assert d["warm_hit_every_time"] is True
    # Timings of a 32-token prefill on a shared CPU are noise; the hit itself is what must hold here.
    assert _positive(d["warm_over_cold"]) and _positive(d["other_tenant_same_prompt_ttft_ms"])
    e = result["e"]
    for run in (e["lora"], e["base"]):
        assert run["failed"] == 0 and run["output_tokens"] == e["lora"]["output_tokens"]
        assert _positive(run["tokens_per_s"]) and run["ttft_p99_ms"] >= run["ttft_p50_ms"] > 0
    assert e["adapter_loads"] >= 1 and e["distinct_adapters_used"] >= 2
    f = result["f"]
    for key in ("disk_to_gpu_ms", "disk_to_cpu_ms", "cpu_to_gpu_ms", "adapter_bytes"):
        assert _positive(f[key]), key


def test_adapter_from_s3_to_a_slot(result: dict) -> None:
    # boto3 and moto are installed wherever this runs (CI, --smoke): the S3 part must not be skipped.
    f = result["f"]
    assert not f["s3"].startswith("skipped"), f["s3"]
    for key in ("s3_to_gpu_ms", "s3_download_ms", "s3_cache_to_gpu_ms", "s3_download_MBps"):
        assert _positive(f[key]), key
    assert f["s3_object_bytes"] > f["adapter_bytes"]  # the tensors plus the safetensors header
    assert f["s3_to_gpu_ms"] > f["s3_download_ms"]


def test_s3_part_says_why_it_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU machine without the carried wheels: f must still run and say what is missing.
    from benchmarks.serving_s3 import workload_f_s3

    monkeypatch.setitem(sys.modules, "moto.server", None)
    out = workload_f_s3(None)  # type: ignore[arg-type]  # returns before the bench is touched
    assert list(out) == ["s3"] and out["s3"].startswith("skipped: ") and "moto.server" in out["s3"]
