"""benchmarks/serving.py --only v on the CPU demo model: workload v runs end to end (the GPU run is the
measurement; this keeps the code from rotting between device runs)."""

from __future__ import annotations

import pytest

from tests.benchmarks.smoke import run_smoke


@pytest.mark.slow
def test_spec_workload_runs(tmp_path: pytest.TempPathFactory) -> None:
    v = run_smoke(tmp_path, "v")["v"]
    assert "error" not in v, v
    assert [row["batch"] for row in v["verify_cost"]] == [1, 2]
    assert all(row["k8_ms"] > 0 for row in v["verify_cost"])
    for b in ("b1", "b2"):
        run = v[b]
        # The oracle drafts the base run's own continuation: every draft accepted, the same tokens.
        assert run["oracle"]["acceptance"] == 1.0 and run["oracle"]["same_tokens"]
        assert run["oracle"]["tokens_per_step"] > run["base"]["tokens_per_step"]
        for name in ("ngram", "draft_adaptive", "draft_always"):
            assert run[name]["same_tokens"], name
        assert run["draft_always"]["propose_ms"] > 0 and run["base"]["propose_ms"] == 0
        assert run["base"]["step_ms_p50"] > 0
    # The last batch again on an engine in deterministic mode: the oracle's drafts all accepted there too.
    det = v["b2_deterministic"]
    assert det["oracle"]["acceptance"] == 1.0 and det["oracle"]["same_tokens"]
