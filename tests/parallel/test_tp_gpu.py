"""tensor_parallel_size=2 on two GPUs (NCCL, the Triton kernels, CUDA graphs on and off), float32, against
transformers + PEFT, and a worker killed there: the same checks the CPU tests run over gloo. Needs a host
with 2 GPUs (nvidia-h200-x2); skipped elsewhere."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from engine import SamplingParams
from engine.step_guard import EngineFault
from tests.helpers.hf_families import check_family, make_family_model, make_llm, prompts
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism on GPUs needs 2 of them"),
]


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_tp2_on_two_gpus_equals_transformers_and_peft(arch, cuda_graphs, tmp_path):
    targets = ALL_TARGETS if arch == "llama" else ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    base = make_family_model(tmp_path / "base", arch)
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=8, target_modules=targets, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=4, target_modules=targets[:2], seed=2),
    }
    check_family(
        base, adapters, lengths=(11, 17, 23), device="cuda", tensor_parallel_size=2, cuda_graphs=cuda_graphs
    )


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_fully_sharded_loras_on_two_gpus_equals_transformers_and_peft(cuda_graphs, tmp_path):
    """fully_sharded_loras over NCCL: the shrink's all-gather eager and inside captured graphs (and the
    kernel warm-up's), max_lora_rank 7 padded to 8, adapters of rank 5 and 3."""
    base = make_family_model(tmp_path / "base", "llama")
    adapters = {
        "a": make_peft_adapter(base, tmp_path / "a", r=5, target_modules=ALL_TARGETS, seed=1),
        "b": make_peft_adapter(base, tmp_path / "b", r=3, target_modules=("q_proj", "up_proj"), seed=2),
    }
    check_family(
        base, adapters, lengths=(11, 17, 23), device="cuda", tensor_parallel_size=2, cuda_graphs=cuda_graphs,
        fully_sharded_loras=True, max_lora_rank=7,
    )  # fmt: skip


def test_killed_gpu_worker_fails_the_engine_within_seconds(tmp_path):
    """NCCL waits forever for a lost peer: the watcher's abort must end rank 0's collective."""
    base = make_family_model(tmp_path / "base", "llama", max_position_embeddings=1024)
    llm = make_llm(base, device="cuda", tensor_parallel_size=2, num_kv_blocks=512)
    engine = llm.engine
    for i, p in enumerate(prompts(4, 1, (9, 14))):
        engine.add_request(str(i), p, SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):
        engine.step()
    pid = engine.runner.workers.procs[0].pid
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(EngineFault):
        while time.monotonic() - killed < 60:
            engine.step()
    assert time.monotonic() - killed < 10.0
    engine.close()
