"""Without a GPU: the decode attention kernel of a layer without window or soft-cap compiles (sm_90) to
the same machine code as the kernel file of the last commit before windows, so full-attention layers
keep their decode speed (WINDOW and SOFTCAP are constexprs: off, their code is not compiled in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.conftest import ON_GPU

pytestmark = [pytest.mark.skipif(ON_GPU, reason="compiles for sm_90 on a CPU"), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
BEFORE_WINDOWS = "cf0e904"  # the last commit whose kernels/attention.py has no window


def test_no_window_kernel_is_the_kernel_before_windows(tmp_path):
    shown = subprocess.run(
        ["git", "show", f"{BEFORE_WINDOWS}:kernels/attention.py"], cwd=REPO, capture_output=True, text=True
    )
    if shown.returncode != 0:
        pytest.skip(f"commit {BEFORE_WINDOWS} is not in this checkout (shallow clone?)")
    before = tmp_path / "attention_before.py"
    before.write_text(shown.stdout)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "tests/kernels/attention_window_sass.py", str(before)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["no_window_same_opcodes_as_before"], out
    assert out["no_window"] == out["before"]
    # Positive control: the switches do change the code when on.
    assert out["window"]["instructions"] > out["no_window"]["instructions"]
    assert out["softcap"]["mem_mma_mufu"] > out["no_window"]["mem_mma_mufu"]
