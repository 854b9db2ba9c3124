"""benchmarks/serving_tp.py --smoke runs on the CPU (gloo) and writes its table: the GPU command the
docs give is exercised end to end, on the demo model."""

from __future__ import annotations

import json

import pytest

from benchmarks.serving_tp import main

pytestmark = pytest.mark.slow


def test_serving_tp_smoke(tmp_path, one_torch_thread):
    result = main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "serving_tp.json").read_text()) == result
    runs = {(r["tp"], r["engine"]): r for r in result["runs"]}
    assert set(runs) == {
        (1, "one GPU, as served"),
        (1, "tensor parallel"),
        (2, "tensor parallel"),
    }
    two = runs[(2, "tensor parallel")]
    assert [b["batch"] for b in two["base"]] == [1, 4] and two["qkvo"]["tokens_per_s"] > 0
    assert len(two["ranks"]) == 2 and all(r["kv_blocks"] == 256 for r in two["ranks"])
