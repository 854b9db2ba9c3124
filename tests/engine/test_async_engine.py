"""AsyncLLMEngine: the loop thread, streamed deltas, abort, client disconnects, engine death, stats."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    LoRARequest,
    RequestFailedError,
    SamplingParams,
)
from tests.helpers.hf_models import hf_greedy, make_peft_adapter, make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread_for_module")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("async")
    base = make_tiny_model(root / "base", "llama")
    return base, make_peft_adapter(base, root / "a", r=4)


@pytest.fixture
async def engine(model):
    config = EngineConfig(
        model=str(model[0]), device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, max_lora_rank=8
    )
    eng = AsyncLLMEngine.from_config(config)
    eng.start()
    yield eng
    await eng.shutdown()


async def collect(eng, rid, prompt, params=GREEDY, **kw):
    return [out async for out in eng.generate(rid, prompt, params, **kw)]


async def wait_idle(eng, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while eng.stats().running or eng.stats().waiting:
        assert time.monotonic() < deadline, eng.stats()
        await asyncio.sleep(0.01)


async def test_streamed_deltas_add_up_to_the_final_output(engine, model):
    prompt = [0, 17, 99, 150, 7]
    outs = await collect(engine, "r1", prompt)
    final = outs[-1]
    assert final.finished and not any(o.finished for o in outs[:-1])
    c = final.outputs[0]
    assert c.token_ids == hf_greedy(model[0], {}, [prompt], [None], 8)[0]
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == c.token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == c.text
    # Nothing streamed is ever taken back: each cumulative text is a prefix of the final one (a random
    # model may emit bytes that are not UTF-8 at all; those U+FFFD are in the final text too).
    streamed = ""
    for o in outs:
        streamed += o.outputs[0].delta_text
        assert c.text.startswith(streamed) and o.outputs[0].text == streamed
    assert c.finish_reason == "length" and final.request_id == "r1"
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


async def test_concurrent_requests_with_and_without_an_adapter(engine, model):
    base, adapter = model
    prompts = [[0, 5, 6, 7], [0, 8, 9, 10, 11], [0, 12, 13], [0, 14, 15, 16]]
    names = ["a", None, "a", None]
    loras = [LoRARequest("a", str(adapter)) if n else None for n in names]
    results = await asyncio.gather(
        *(
            collect(engine, f"c{i}", p, lora=lo, cache_salt="t")
            for i, (p, lo) in enumerate(zip(prompts, loras, strict=True))
        )
    )
    got = [r[-1].outputs[0].token_ids for r in results]
    assert got == hf_greedy(base, {"a": adapter}, prompts, names, 8)


async def test_abort_ends_the_stream_with_finish_reason_abort(engine):
    outs = []
    async for out in engine.generate("long", [0, 5, 6], LONG):
        outs.append(out)
        if len(outs) == 3:
            engine.abort("long")
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 400
    await wait_idle(engine)
    assert engine.stats().kv_usage == 0.0


async def test_a_client_that_walks_away_aborts_its_request(engine):
    gen = engine.generate("gone", [0, 5, 6], LONG)
    await gen.__anext__()
    await gen.aclose()
    await wait_idle(engine)
    # The id is free again: the engine really dropped the request.
    assert (await collect(engine, "gone", [0, 5, 6]))[-1].finished


async def test_bad_requests_raise_before_running_and_leave_the_engine_healthy(engine):
    with pytest.raises(ValueError, match="token ids"):
        await collect(engine, "bad", [0, 10**6])
    with pytest.raises(ValueError, match="context"):
        await collect(engine, "bad", [5] * 600)
    gen = engine.generate("dup", [0, 5], LONG)
    await gen.__anext__()
    with pytest.raises(ValueError, match="already"):
        await collect(engine, "dup", [0, 5])
    await gen.aclose()
    assert engine.is_healthy
    assert (await collect(engine, "ok", [0, 5]))[-1].finished


async def test_a_broken_adapter_fails_only_its_request(engine, model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((model[1] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RequestFailedError, match="could not be loaded"):
        await collect(engine, "broken", [0, 5], lora=LoRARequest("broken", str(broken)))
    assert engine.is_healthy
    assert (await collect(engine, "fine", [0, 5]))[-1].finished


async def test_an_exception_in_the_loop_fails_everyone_and_marks_the_engine_dead(engine):
    gens = [engine.generate(f"d{i}", [0, 5 + i, 6], LONG) for i in range(3)]
    for g in gens:
        await g.__anext__()
    runner = engine.engine.runner

    def explode(batch, **kw):
        raise RuntimeError("CUDA error: boom: device lost")  # the device's fault: no request is blamed

    runner.execute = explode
    for g in gens:
        with pytest.raises(EngineDeadError, match="boom: device lost"):
            async for _ in g:
                pass
    assert not engine.is_healthy and "boom: device lost" in engine.dead_error
    with pytest.raises(EngineDeadError, match="dead"):
        await collect(engine, "after", [0, 5])
    engine.abort("d0")  # harmless on a dead engine
    engine.evict_adapter("0" * 64)


async def test_stats_show_running_waiting_and_adapter_names(engine, model):
    lora = LoRARequest("tenant-adapter", str(model[1]))
    gen = engine.generate("s", [0, 5, 6], LONG, lora=lora)
    await gen.__anext__()
    await asyncio.sleep(0.05)  # stats are a snapshot taken after each step; let one more step pass
    stats = engine.stats()
    assert stats.running == 1 and stats.waiting == 0
    assert stats.running_adapters == ["tenant-adapter"]
    assert 0.0 < stats.kv_usage < 1.0 and stats.num_kv_blocks == 256
    assert stats.adapter_cache["gpu_resident"] == 1.0
    assert stats.prefix_queried_tokens == 3 and stats.prefix_hit_tokens == 0 and stats.num_preemptions == 0
    await gen.aclose()
    await wait_idle(engine)
    engine.evict_adapter(lora.content_hash)
    deadline = time.monotonic() + 5
    while engine.engine.adapter_cache.stats()["gpu_resident"] != 0.0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert time.monotonic() - engine.last_tick < 2.0


async def test_tokenizer_helpers(engine):
    ids = engine.encode("Hello, world!")
    assert engine.decode(ids).endswith("Hello, world!")
    chat = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert all(isinstance(t, int) for t in chat)
    assert engine.decode(chat).endswith("<|im_start|>assistant\n")
    assert engine.max_model_len == 512 and engine.vocab_size == 512 and engine.model_name == "base"


async def test_shutdown_fails_in_flight_requests_and_refuses_new_ones(model):
    config = EngineConfig(model=str(model[0]), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
    eng = AsyncLLMEngine.from_config(config)
    with pytest.raises(EngineDeadError, match="not started"):
        await collect(eng, "early", [0, 5])
    eng.start()
    gen = eng.generate("x", [0, 5, 6], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    await gen.__anext__()
    await eng.shutdown()
    with pytest.raises(EngineDeadError, match="shut down"):
        async for _ in gen:
            pass
    with pytest.raises(EngineDeadError):
        await collect(eng, "late", [0, 5])


async def test_fairness_key_reaches_the_scheduler(model):
    config = EngineConfig(
        model=str(model[0]), device="cpu", dtype="float32", block_size=4, num_kv_blocks=256, max_num_seqs=2
    )
    eng = AsyncLLMEngine.from_config(config)
    done: list[str] = []

    async def run(rid: str, prompt: list[int], key: str) -> None:
        async for out in eng.generate(rid, prompt, GREEDY, fairness_key=key):
            if out.finished:
                done.append(rid)

    eng.start()
    # The light request arrives last: in arrival order it would finish last, 13th.
    tasks = [asyncio.create_task(run(f"heavy{i}", [0, 10 + i, 20 + i, 30 + i], "heavy")) for i in range(12)]
    tasks.append(asyncio.create_task(run("light", [0, 99, 98, 97], "light")))
    await asyncio.gather(*tasks)
    await eng.shutdown()
    # Two seats: the light request takes the first seat that frees up once it has arrived (the loop thread
    # may already have started a few heavy ones by then).
    assert done.index("light") <= 5, done


async def test_a_caller_cancelled_before_its_request_was_added_leaves_nothing_running(engine):
    task = asyncio.create_task(collect(engine, "cancelled", [0, 5, 6], LONG))
    await asyncio.sleep(0)  # generate() has submitted the add and waits for it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)
    assert (await collect(engine, "cancelled", [0, 5]))[-1].finished  # the id is free again


async def test_a_refused_duplicate_never_aborts_the_request_that_owns_the_id(engine):
    owner = engine.generate(
        "shared-id", [0, 5, 6], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    )
    await owner.__anext__()
    dup = asyncio.create_task(collect(engine, "shared-id", [0, 7]))
    await asyncio.sleep(0)
    dup.cancel()  # cancelled while its (refused) add is in flight
    with pytest.raises((asyncio.CancelledError, ValueError)):
        await dup
    outs = [out async for out in owner]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert len(outs[-1].outputs[0].token_ids) == 30


async def test_random_concurrent_traffic_with_aborts_and_disconnects_leaves_nothing_behind(engine, model):
    import random

    rng = random.Random(7)
    lora = LoRARequest("a", str(model[1]))
    plans = []
    for i in range(24):
        prompt = [0] + [rng.randrange(4, 500) for _ in range(rng.randrange(2, 20))]
        plans.append(
            (f"t{i}", prompt, rng.choice([None, lora]), rng.choice(["run", "run", "abort", "leave"]))
        )
    expected = {}

    async def one(rid, prompt, lo, plan):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=rng.choice([1, 2]))
        got = []
        async for out in engine.generate(rid, prompt, params, lora=lo, fairness_key=rid[-1]):
            got.append(out)
            if plan == "abort" and len(got) == 2:
                engine.abort(rid)
            if plan == "leave" and len(got) == 2:
                break
        expected[rid] = (prompt, lo, plan, got)

    await asyncio.gather(*(one(*p) for p in plans))
    await wait_idle(engine)
    assert not engine.engine.has_unfinished() and not engine._streams
    assert engine.stats().kv_usage == 0.0 and engine.engine.adapter_cache.stats()["pinned"] == 0
    finished = [(rid, v) for rid, v in expected.items() if v[2] == "run"]
    names = ["a" if v[1] else None for _, v in finished]
    oracle = hf_greedy(model[0], {"a": model[1]}, [v[0] for _, v in finished], names, 12)
    for (rid, (_, _, _, got)), want in zip(finished, oracle, strict=True):
        final = got[-1]
        assert final.finished and all(c.token_ids == want for c in final.outputs if c.finished), rid
    for rid, (_, _, plan, got) in expected.items():
        if plan == "abort":
            assert got[-1].finished and {c.finish_reason for c in got[-1].outputs} <= {"abort", "length"}, rid
