"""A tensor-parallel worker that dies makes the engine dead within seconds (no hang in a collective),
and no worker process outlives its engine: close(), garbage collection, or a dead peer."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import threading
import time

import psutil
import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.parallel.driver import build
from engine.step_guard import EngineFault, is_engine_fault
from tests.helpers.hf_families import make_family_model, make_llm, prompts

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_family_model(
        tmp_path_factory.mktemp("tp-failure") / "base", "llama", max_position_embeddings=1024
    )


def _children() -> set[int]:
    """Our child processes, without multiprocessing's own resource tracker (started by the first spawn,
    it lives as long as this process and is no worker)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ours = {c.pid for c in psutil.Process().children(recursive=True)}
        alive = [
            p for p in pids if p in ours or (psutil.pid_exists(p) and psutil.Process(p).status() != "zombie")
        ]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_worker_killed_mid_generation_fails_the_engine_within_seconds(base, one_torch_thread):
    llm = make_llm(base, tensor_parallel_size=2, num_kv_blocks=512)
    engine = llm.engine
    pids = [p.pid for p in engine.runner.workers.procs]
    for i, p in enumerate(prompts(4, 1, (9, 14))):
        engine.add_request(str(i), p, LONG)
    for _ in range(3):
        engine.step()  # running: decode steps in flight
    killed = threading.Event()
    killed_at = [0.0]

    def kill() -> None:
        killed_at[0] = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        killed.set()

    threading.Timer(0.2, kill).start()  # lands inside a step (a collective) or between two
    with pytest.raises(EngineFault) as err:
        while True:
            engine.step()
            if killed.is_set():
                break
        while time.monotonic() - killed_at[0] < 30:
            engine.step()
    assert killed.is_set()
    assert time.monotonic() - killed_at[0] < 5.0
    assert is_engine_fault(err.value) and "rank 1" in str(err.value)
    with pytest.raises(EngineFault):  # stays dead: no later step runs on ranks out of step
        engine.step()
    engine.close()
    assert _gone(pids)


def test_idle_async_engine_reports_dead_after_a_worker_dies(base, one_torch_thread):
    config = EngineConfig(model=str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
                          tensor_parallel_size=2)  # fmt: skip
    engine = AsyncLLMEngine.from_config(config)
    engine.start()
    pids = [p.pid for p in engine.engine.runner.workers.procs]

    async def one() -> list[int]:
        outs = [o async for o in engine.generate("r", prompts(1, 2, (7,))[0], SamplingParams(max_tokens=4))]
        return list(outs[-1].outputs[0].token_ids)

    assert len(asyncio.run(one())) == 4  # the engine works first
    assert engine.is_healthy
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while engine.is_healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.is_healthy and "rank 1" in (engine.dead_error or "")
    asyncio.run(engine.shutdown())
    assert _gone(pids)


def test_close_and_garbage_collection_leave_no_worker(base, one_torch_thread):
    llm = make_llm(base, tensor_parallel_size=2)
    pids = [p.pid for p in llm.engine.runner.workers.procs]
    assert all(psutil.pid_exists(p) for p in pids)
    started = time.monotonic()
    llm.engine.close()  # STOP: the workers exit on their own
    assert _gone(pids) and time.monotonic() - started < 5.0
    llm.engine.close()  # twice is harmless
    llm = make_llm(base, tensor_parallel_size=2)
    pids = [p.pid for p in llm.engine.runner.workers.procs]
    del llm
    gc.collect()
    assert _gone(pids)


def _fail_on_workers(cfg, device):
    """A WeightSource that fails in the worker processes only (rank 0 loads from the folder's weights)."""
    if multiprocessing.current_process().name.startswith("loraplex-tp-rank"):
        raise OSError("disk on fire")
    from engine.model_loader import iter_weights

    return iter_weights(_fail_on_workers.folder)  # type: ignore[attr-defined]


def test_a_worker_that_fails_to_start_fails_the_start_with_its_error(base, one_torch_thread):
    _fail_on_workers.folder = str(base)  # type: ignore[attr-defined]
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", num_kv_blocks=64, tensor_parallel_size=2
    )
    before = _children()
    with pytest.raises(RuntimeError, match=r"rank 1.*disk on fire"):
        build(config, None, _fail_on_workers)
    assert _children() <= before  # the failed worker was reaped, nothing else left running


def test_bad_sizes_are_refused_before_any_process_starts(base):
    before = _children()
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        make_llm(base, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model=str(base), tensor_parallel_size=0)
    for extra in (
        {"quantization": "fp8"},
        {"deterministic": True},
        {"speculative_config": {"method": "ngram"}},
    ):
        with pytest.raises(ValueError, match="tensor_parallel_size > 1 does not combine with"):
            EngineConfig(model=str(base), tensor_parallel_size=2, **extra)
    assert _children() <= before
