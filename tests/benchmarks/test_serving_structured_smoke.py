"""benchmarks/serving.py --only s on the CPU demo model: workload s runs and reports sane numbers (the GPU
run is the measurement; this keeps the code from rotting between device runs)."""

from __future__ import annotations

import pytest

from tests.benchmarks.smoke import run_smoke


def test_structured_workload_runs(tmp_path: pytest.TempPathFactory) -> None:
    s = run_smoke(tmp_path, "s")["s"]
    assert "error" not in s, s
    assert s["constrained"]["tokens"] == s["unconstrained"]["tokens"] == s["batch"] * s["new_tokens"]
    assert s["constrained"]["steps_ahead"] > 0 and s["unconstrained"]["steps_ahead"] > 0
    assert s["constrained_outputs_are_json_prefixes"]
    assert 0 < s["compile_cached_ms"] < s["compile_cold_ms"]
    assert s["constrained_over_unconstrained"] > 0
    assert (
        s["constrained"]["host_ms_per_step"]["masks"] > 0 == s["unconstrained"]["host_ms_per_step"]["masks"]
    )
    assert set(s["mask_costs"]) == {"pin_new_buffer_ms", "fill_thread_pool_ms", "fill_one_thread_ms"}
