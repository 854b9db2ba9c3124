"""Without a GPU: every launch the wrappers make at Llama-3-8B shapes compiles for an H100 (sm_90), and
its machine code has the properties the speed depends on (16-byte loads, tensor-core products, no spills).
A compile error or a lost vectorisation shows up in CI instead of on the accelerator machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.conftest import ON_GPU

# slow: compiling every launch for sm_90 takes ~20 s of CPU.
pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels compile for real in the other tests"),
    pytest.mark.slow,
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "tests/kernels/sm90_compile.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def by_kernel(launches: list[dict], name: str) -> list[dict]:
    found = [x for x in launches if x["kernel"] == name]
    assert found, f"{name} was never launched"
    return found


def count(ops: dict[str, int], prefix: str) -> int:
    return sum(n for op, n in ops.items() if op.startswith(prefix))


def test_every_kernel_compiles_for_sm90(launches):
    names = {x["kernel"] for x in launches}
    assert names == {"_shrink_kernel", "_expand_kernel", "_attention_kernel", "_merge_splits_kernel",
                     "_write_kv_kernel"}  # fmt: skip


def test_weight_and_cache_reads_are_16_byte_vectors(launches):
    for x in by_kernel(launches, "_shrink_kernel") + by_kernel(launches, "_attention_kernel"):
        assert count(x["ops"], "LDGSTS.E.BYPASS.128") + count(x["ops"], "LDG.E.128") >= 8, x
    for x in by_kernel(launches, "_expand_kernel"):
        wide_loads = count(x["ops"], "LDG.E.128") + count(x["ops"], "LDGSTS.E.BYPASS.128")
        assert wide_loads >= 4 and count(x["ops"], "STG.E.128") >= 1, x
    for x in by_kernel(launches, "_write_kv_kernel"):
        assert count(x["ops"], "STG.E.128") >= 2, x


def test_products_use_tensor_cores_and_nothing_spills(launches):
    for x in launches:
        if x["kernel"] in ("_shrink_kernel", "_expand_kernel", "_attention_kernel"):
            assert count(x["ops"], "HMMA") + count(x["ops"], "HGMMA") > 0, x
        assert count(x["ops"], "LDL") + count(x["ops"], "STL") <= 2, x  # a stray spill slot at most
