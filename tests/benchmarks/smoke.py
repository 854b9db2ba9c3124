"""One `benchmarks.serving --smoke` run for the smoke tests: the workloads asked for, on the CPU demo model,
torch's thread count restored after (--smoke sets it to 1); returns serving.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_smoke(out: Path, only: str | None = None) -> dict[str, Any]:
    import torch

    from benchmarks.serving import main

    args = ["--smoke", "--out", str(out), "--work", str(out / "work")]
    if only is not None:
        args += ["--only", only]
    threads = torch.get_num_threads()
    try:
        main(args)
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "serving.json").read_text())  # type: ignore[no-any-return]
