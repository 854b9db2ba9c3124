"""Our model + runner against transformers (+ PEFT) on the same small random models, float32.

Logits are compared at every computed position, also when the context comes from KV written by earlier
chunks, when sequences of different lengths share a step, and when adapters of different ranks and
target sets are mixed with base-model tokens in one batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams
from tests.helpers.hf_models import (
    ALL_TARGETS,
    LLAMA3_ROPE,
    hf_greedy,
    hf_logits,
    load_hf,
    make_peft_adapter,
    make_tiny_model,
)

# Each test builds HF and PEFT models beside ours (about a minute for the file): `make test` runs them,
# `make test-fast` leaves them to tests/engine/test_llm_vs_hf.py.
pytestmark = pytest.mark.slow
ATOL = 2e-4

ARCHS = {
    "llama": ("llama", {}),
    "llama3-tied": (
        "llama",
        {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True, "num_hidden_layers": 3},
    ),
    # head_dim * heads != hidden (128 vs 64) and 4:1 GQA: catches any shape that assumes otherwise.
    "mistral": ("mistral", {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}),
    "qwen2": ("qwen2", {}),
}


def make_runner(model_dir: Path, num_blocks: int = 64, max_loras: int = 4) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_kv_blocks=num_blocks,
        max_loras=max_loras,
        max_cpu_loras=max(max_loras, 1),
        max_lora_rank=16,
    )
    loaded = load_model(config)
    return ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))


class Blocks:
    """The smallest block allocator: hands out fresh block ids, never reuses (tests only)."""

    def __init__(self, block_size: int) -> None:
        self.block_size, self.next = block_size, 1  # block 0 stays unused: a wrong table shows up

    def grow(self, req: Request, upto: int) -> None:
        while len(req.block_table) * self.block_size < upto:
            req.block_table.append(self.next)
            self.next += 1


def new_request(rid: str, prompt: list[int], slot: int = -1) -> Request:
    req = Request(request_id=rid, prompt_token_ids=prompt, params=SamplingParams(temperature=0.0))
    req.lora_slot = slot
    return req


def run_step(runner: ModelRunner, blocks: Blocks, batch: list[tuple[Request, int]]) -> torch.Tensor:
    for req, n in batch:
        blocks.grow(req, req.num_computed_tokens + n)
    logits = runner.execute(batch)
    for req, n in batch:
        req.num_computed_tokens += n
    return logits


def prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [0, *torch.randint(4, 512, (length - 1,), generator=gen).tolist()]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, overrides = ARCHS[request.param]
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)


def test_chunked_prefill_and_mixed_lengths_match_hf(arch_model: Path) -> None:
    runner = make_runner(arch_model)
    hf = load_hf(arch_model)
    blocks = Blocks(runner.block_size)
    long, short = prompt(1, 23), prompt(2, 9)
    ref_long, ref_short = hf_logits(hf, long), hf_logits(hf, short)
    a, b = new_request("a", long), new_request("b", short)
    # Step 1: a's first chunk (7 tokens, crossing a block edge) with all of b.
    out = run_step(runner, blocks, [(a, 7), (b, 9)])
    torch.testing.assert_close(out[0], ref_long[6], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], ref_short[8], atol=ATOL, rtol=0)
    # Step 2: a's next chunk reads the KV written in step 1.
    out = run_step(runner, blocks, [(a, 10)])
    torch.testing.assert_close(out[0], ref_long[16], atol=ATOL, rtol=0)
    # Step 3: a finishes its prompt one token at a time, like decodes, next to nothing else.
    for pos in range(17, 23):
        out = run_step(runner, blocks, [(a, 1)])
        torch.testing.assert_close(out[0], ref_long[pos], atol=ATOL, rtol=0)


def test_greedy_decode_matches_hf(arch_model: Path) -> None:
    runner = make_runner(arch_model)
    blocks = Blocks(runner.block_size)
    prompts = [prompt(3, 11), prompt(4, 6), prompt(5, 14)]
    reqs = [new_request(str(i), p) for i, p in enumerate(prompts)]
    batch = [(r, r.num_tokens) for r in reqs]
    for _ in range(8):
        logits = run_step(runner, blocks, batch)
        for req, row in zip(reqs, logits, strict=True):
            req.append_token(int(row.argmax()))
        batch = [(r, 1) for r in reqs]
    expected = hf_greedy(arch_model, {}, prompts, [None] * 3, max_new_tokens=8)
    assert [r.output_token_ids for r in reqs] == expected
    assert len({tuple(e) for e in expected}) == 3  # the prompts really lead to different continuations


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lora")
    # q width (4 x 32) differs from hidden (64): o_proj LoRA has in != out, q/k/v slices differ in width.
    base = make_tiny_model(root / "base", "qwen2", head_dim=32)
    adapters = {
        "all8": make_peft_adapter(base, root / "all8", r=8, target_modules=ALL_TARGETS, seed=1),
        "qv4": make_peft_adapter(base, root / "qv4", r=4, target_modules=("q_proj", "v_proj"), seed=2),
        "mlp16rs": make_peft_adapter(
            base,
            root / "mlp16rs",
            r=16,
            alpha=8,
            target_modules=("gate_proj", "down_proj"),
            use_rslora=True,
            seed=3,
        ),
        "pattern": make_peft_adapter(
            base,
            root / "pattern",
            r=6,
            target_modules=("k_proj", "o_proj", "up_proj"),
            rank_pattern={"o_proj": 2},
            alpha_pattern={"up_proj": 32},
            seed=4,
        ),
    }
    return base, adapters


def _acquire_all(runner: ModelRunner, adapters: dict[str, Path]) -> dict[str, int]:
    cache = runner.adapter_cache
    slots: dict[str, int] = {}
    for name, path in adapters.items():
        lora = LoRARequest(name, str(path))
        deadline = time.monotonic() + 60
        # None while the background load runs, and on CUDA until the slot copy's event has completed.
        while (slot := cache.acquire(lora)) is None:
            assert time.monotonic() < deadline, f"adapter {name} never became resident"
            cache.wait_for_loads(timeout=1)
            time.sleep(0.001)
        slots[name] = slot
    return slots


def test_mixed_adapters_in_one_batch_match_peft(lora_setup: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = lora_setup
    runner = make_runner(base, max_loras=4)
    slots = _acquire_all(runner, adapters)
    assert sorted(slots.values()) == [0, 1, 2, 3]
    hf = load_hf(base, adapters)
    blocks = Blocks(runner.block_size)
    names: list[str | None] = ["all8", None, "qv4", "mlp16rs", "pattern", "all8", None]
    prompts = [prompt(10 + i, 5 + 2 * i) for i in range(len(names))]
    reqs = [
        new_request(str(i), p, -1 if n is None else slots[n])
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    # The first chunk of every prompt in one step, then the rest in a second one.
    first = run_step(runner, blocks, [(r, 4) for r in reqs])
    rest = run_step(runner, blocks, [(r, r.num_tokens - 4) for r in reqs])
    base_hf = load_hf(base)
    for i, (p, name) in enumerate(zip(prompts, names, strict=True)):
        ref = hf_logits(hf, p, name)
        torch.testing.assert_close(first[i], ref[3], atol=ATOL, rtol=0)
        torch.testing.assert_close(rest[i], ref[-1], atol=ATOL, rtol=0)
        if name is not None:  # positive control: the adapter really changes the logits
            assert (ref[-1] - hf_logits(base_hf, p)[-1]).abs().max() > 1e-2


def test_mixed_adapter_greedy_matches_peft(lora_setup: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = lora_setup
    runner = make_runner(base, max_loras=4)
    slots = _acquire_all(runner, adapters)
    blocks = Blocks(runner.block_size)
    names: list[str | None] = [None, "all8", "qv4", "mlp16rs", "pattern"]
    prompts = [prompt(30, 8)] * len(names)  # same prompt: only the adapter differs
    reqs = [
        new_request(str(i), p, -1 if n is None else slots[n])
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    batch = [(r, r.num_tokens) for r in reqs]
    for _ in range(6):
        logits = run_step(runner, blocks, batch)
        for req, row in zip(reqs, logits, strict=True):
            req.append_token(int(row.argmax()))
        batch = [(r, 1) for r in reqs]
    expected = hf_greedy(base, adapters, prompts, names, max_new_tokens=6)
    assert [r.output_token_ids for r in reqs] == expected
    assert len({tuple(e) for e in expected}) >= 3


_BACKEND_CHILD = """
import json, sys
import torch
from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams

base, adapters = sys.argv[1], sys.argv[2:]
rows = {}
for backend in ("ref", "triton"):
    cfg = EngineConfig(model=base, device="cpu", dtype="float32", num_kv_blocks=32, block_size=4,
                       max_loras=2, max_lora_rank=16, kernel_backend=backend)
    loaded = load_model(cfg)
    cache = AdapterCache.for_model(cfg, loaded)
    runner = ModelRunner(cfg, loaded, cache)
    slots = []
    for path in adapters:
        lora = LoRARequest("x", path)
        if cache.acquire(lora) is None:
            cache.wait_for_loads(30)
        slots.append(cache.acquire(lora))
    reqs = []
    for i, slot in enumerate([slots[0], -1, slots[1]]):
        req = Request(request_id=str(i), prompt_token_ids=[0, *range(10 + i, 20 + 2 * i)], params=SamplingParams())
        req.lora_slot, req.block_table = slot, [3 * i + 1, 3 * i + 2, 3 * i + 3, 20 + i, 25 + i]
        reqs.append(req)
    first = runner.execute([(r, 5) for r in reqs])
    for r in reqs:
        r.num_computed_tokens = 5
    rest = runner.execute([(r, r.num_tokens - 5) for r in reqs])
    rows[backend] = (runner.ops.name, torch.cat([first, rest]).tolist())
print(json.dumps(rows))
"""


def test_triton_backend_matches_reference_in_interpreter(lora_setup: tuple[Path, dict[str, Path]]) -> None:
    """The model drives the Triton kernels through ops.py exactly as the references (shapes, dtypes,
    contiguity): run both backends under Triton's interpreter, in a child so the mode stays there."""
    import json
    import os
    import subprocess
    import sys

    base, adapters = lora_setup
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    paths = [str(adapters["all8"]), str(adapters["qv4"])]
    done = subprocess.run(
        [sys.executable, "-c", _BACKEND_CHILD, str(base), *paths],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert rows["ref"][0] == "ref" and rows["triton"][0] == "triton"
    ref, tri = torch.tensor(rows["ref"][1]), torch.tensor(rows["triton"][1])
    torch.testing.assert_close(tri, ref, atol=ATOL, rtol=0)


def test_runner_refuses_bad_steps(lora_setup: tuple[Path, dict[str, Path]]) -> None:
    base, _ = lora_setup
    runner = make_runner(base, num_blocks=8, max_loras=2)
    with pytest.raises(ValueError, match="empty batch"):
        runner.execute([])
    req = new_request("r", prompt(40, 9))
    req.block_table = [1, 2]  # 8 slots for 9 tokens
    with pytest.raises(ValueError, match="2 blocks for 9 tokens"):
        runner.execute([(req, 9)])
    req.block_table = [1, 2, 8]  # block 8 does not exist
    with pytest.raises(ValueError, match="block ids outside"):
        runner.execute([(req, 9)])
    req.block_table = [1, 2, -1]
    with pytest.raises(ValueError, match="block ids outside"):
        runner.execute([(req, 9)])
    req.block_table = [1, 2, 3]
    with pytest.raises(ValueError, match="cannot compute"):
        runner.execute([(req, 10)])
    req.lora_slot = 2
    with pytest.raises(ValueError, match="lora slot 2"):
        runner.execute([(req, 9)])
    req.lora_slot = -1
    bad = new_request("bad", [0, 5, 512])
    bad.block_table = [4]
    with pytest.raises(ValueError, match="token ids outside"):
        runner.execute([(bad, 3)])
    assert runner.execute([(req, 9)]).shape == (1, 512)  # positive control


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_with_adapters_stays_close_to_fp32_peft(
    lora_setup: tuple[Path, dict[str, Path]], dtype: str
) -> None:
    """Half precision cannot be token-exact, but the casts (weights, adapters, KV, float32 LoRA buffers)
    must keep logits close to the fp32 oracle; a wrong cast shows up as an error of order one."""
    base, adapters = lora_setup
    config = EngineConfig(
        model=str(base),
        device="cpu",
        dtype=dtype,
        block_size=4,
        num_kv_blocks=32,
        max_loras=2,
        max_lora_rank=16,
    )
    loaded = load_model(config)
    runner = ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))
    chosen = {k: adapters[k] for k in ("all8", "pattern")}
    slots = _acquire_all(runner, chosen)
    assert runner.adapter_cache.slots.a["q_proj"].dtype == loaded.dtype
    hf = load_hf(base, chosen)
    blocks = Blocks(runner.block_size)
    names: list[str | None] = ["all8", None, "pattern"]
    prompts = [prompt(50 + i, 10 + i) for i in range(3)]
    reqs = [
        new_request(str(i), p, -1 if n is None else slots[n])
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    run_step(runner, blocks, [(r, 6) for r in reqs])
    logits = run_step(runner, blocks, [(r, r.num_tokens - 6) for r in reqs])
    assert logits.dtype == torch.float32
    tolerance = {"bfloat16": 0.05, "float16": 0.01}[dtype]
    for row, p, name in zip(logits, prompts, names, strict=True):
        ref = hf_logits(hf, p, name)[-1]
        error = (row - ref).abs().max()
        assert error < tolerance * ref.abs().max()
        if name is not None:  # the adapter's effect is well above the rounding noise, and present
            effect = (ref - hf_logits(hf, p, None)[-1]).abs().max()
            assert error < 0.25 * effect


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_triton_matches_reference_and_peft(lora_setup: tuple[Path, dict[str, Path]], dtype: str) -> None:
    """On the GPU: Triton kernels vs the references on the same device, and both vs the fp32 CPU oracle,
    with adapters copied into slots on the side stream."""
    base, adapters = lora_setup
    names: list[str | None] = ["all8", None, "qv4", "mlp16rs", "pattern"]
    prompts = [prompt(60 + i, 9 + 3 * i) for i in range(len(names))]
    rows = {}
    for backend in ("ref", "triton"):
        config = EngineConfig(
            model=str(base),
            device="cuda",
            dtype=dtype,
            block_size=4,
            num_kv_blocks=64,
            max_loras=4,
            max_cpu_loras=4,
            max_lora_rank=16,
            kernel_backend=backend,
        )
        loaded = load_model(config)
        runner = ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))
        assert runner.ops.name == backend
        slots = _acquire_all(runner, adapters)
        blocks = Blocks(runner.block_size)
        reqs = [
            new_request(str(i), p, -1 if n is None else slots[n])
            for i, (p, n) in enumerate(zip(prompts, names, strict=True))
        ]
        run_step(runner, blocks, [(r, 5) for r in reqs])
        rows[backend] = run_step(runner, blocks, [(r, r.num_tokens - 5) for r in reqs]).cpu()
    hf = load_hf(base, adapters)
    refs = torch.stack([hf_logits(hf, p, n)[-1] for p, n in zip(prompts, names, strict=True)])
    if dtype == "float32":
        torch.testing.assert_close(rows["triton"], rows["ref"], atol=1e-3, rtol=0)
        torch.testing.assert_close(rows["triton"], refs, atol=1e-3, rtol=0)
    else:
        scale = refs.abs().amax(dim=-1, keepdim=True)
        assert ((rows["triton"] - rows["ref"]).abs() < 0.05 * scale).all()
        assert ((rows["triton"] - refs).abs() < 0.05 * scale).all()


def test_oracle_equals_transformers_generate(lora_setup: tuple[Path, dict[str, Path]]) -> None:
    """The hand-rolled greedy loop of hf_greedy is itself checked against `generate`, per adapter."""
    base, adapters = lora_setup
    chosen = {"qv4": adapters["qv4"]}
    p = prompt(70, 7)
    ours = hf_greedy(base, chosen, [p, p], [None, "qv4"], max_new_tokens=5)
    model = load_hf(base, chosen)
    for name, got in zip(["__base__", "qv4"], ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                adapter_names=[name],
                do_sample=False,
                max_new_tokens=5,
                min_new_tokens=5,
                pad_token_id=1,
            )
        assert out[0, len(p) :].tolist() == got
    assert ours[0] != ours[1]


def test_reusing_another_requests_prefix_blocks_matches_hf(lora_setup: tuple[Path, dict[str, Path]]) -> None:
    """What a prefix-cache hit looks like to the runner: a second request whose block table starts with
    the first one's full blocks and whose computation starts after them."""
    base, _ = lora_setup
    runner = make_runner(base)
    blocks = Blocks(runner.block_size)
    shared = prompt(80, 12)  # three full blocks of 4
    first = new_request("first", [*shared, 7, 8, 9])
    run_step(runner, blocks, [(first, first.num_tokens)])
    second = new_request("second", [*shared, 11, 12, 13, 14, 15])
    second.block_table = first.block_table[:3]
    second.num_computed_tokens = 12
    logits = run_step(runner, blocks, [(second, second.num_tokens - 12)])
    assert second.block_table[:3] == first.block_table[:3] and second.block_table[3] not in first.block_table
    hf = load_hf(base)
    torch.testing.assert_close(logits[0], hf_logits(hf, second.all_token_ids)[-1], atol=ATOL, rtol=0)
    # Negative control: pointing at blocks that hold other tokens gives other logits.
    third = new_request("third", [*prompt(81, 12), 11, 12, 13, 14, 15])
    third.block_table = first.block_table[:3]
    third.num_computed_tokens = 12
    wrong = run_step(runner, blocks, [(third, third.num_tokens - 12)])
    assert (wrong[0] - hf_logits(hf, third.all_token_ids)[-1]).abs().max() > 1e-2
