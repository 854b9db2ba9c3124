"""Any number of query tokens per sequence in one step: k + 1 tokens to verify k drafted ones.

A verify step (every computed token's logits, `all_logits=True`) must give the logits k + 1 single decode
steps give, through the eager path, the uniform graph buckets (CPU: their forward run eagerly over the
same buffers) and, on the GPU, captured graphs.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.adapter_cache import AdapterCache
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.request import LoRARequest, Request
from engine.sampling_params import SamplingParams
from tests.helpers.hf_models import ALL_TARGETS, VOCAB_SIZE, make_peft_adapter, make_tiny_model

K = 3  # drafted tokens per sequence: verify steps of K + 1 query tokens
BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    base = make_tiny_model(root / "base", "llama")
    return base, make_peft_adapter(base, root / "lora", r=8, seed=1, target_modules=ALL_TARGETS)


def make_runner(base: Path, device: str = "cpu") -> ModelRunner:
    config = EngineConfig(
        model=str(base), device=device, dtype="float32", block_size=BLOCK, num_kv_blocks=128,
        max_loras=2, max_cpu_loras=2, max_lora_rank=16, max_num_seqs=8, cuda_graphs=False,
    )  # fmt: skip
    loaded = load_model(config)
    return ModelRunner(config, loaded, AdapterCache.for_model(config, loaded))


def slot_of(runner: ModelRunner, lora_dir: Path) -> int:
    cache = runner.adapter_cache
    lora = LoRARequest("a", str(lora_dir))
    while (slot := cache.acquire(lora)) is None:
        cache.wait_for_loads(timeout=1.0)
    return slot


class Sequences:
    """Requests whose prompts end with K + 1 tokens to compute later (the last sample and K drafts)."""

    made = 0  # sets made so far: each takes its own 16 blocks, so two sets never share KV

    def __init__(self, runner: ModelRunner, slot: int, seed: int = 5) -> None:
        rng = random.Random(seed)
        Sequences.made += 1
        self.next_block = 1 + 16 * (Sequences.made % 7)
        self.requests = []
        for i, length in enumerate((5, 9, 14)):
            tokens = [0] + [rng.randrange(4, VOCAB_SIZE) for _ in range(length + K)]
            req = Request(f"r{i}", tokens, SamplingParams(temperature=0.0))
            req.lora_slot = slot if i != 1 else -1  # adapters mixed with base-model rows
            req.block_table = list(range(self.next_block, self.next_block + -(-len(tokens) // BLOCK)))
            self.next_block += len(req.block_table)
            self.requests.append(req)
        runner.execute([(r, r.num_tokens - K - 1) for r in self.requests])
        for r in self.requests:
            r.num_computed_tokens = r.num_tokens - K - 1


def single_steps(runner: ModelRunner, seqs: Sequences) -> torch.Tensor:
    """Logits [B * (K + 1), V], row-major per sequence, from K + 1 decode steps."""
    steps = []
    for _ in range(K + 1):
        steps.append(runner.execute([(r, 1) for r in seqs.requests]).clone())
        for r in seqs.requests:
            r.num_computed_tokens += 1
    return torch.stack(steps, dim=1).flatten(0, 1)  # [B, K+1, V] -> [B*(K+1), V]


def test_a_verify_step_equals_single_decode_steps(model: tuple[Path, Path]) -> None:
    base, lora = model
    runner = make_runner(base)
    slot = slot_of(runner, lora)
    reference = single_steps(runner, Sequences(runner, slot))
    seqs = Sequences(runner, slot)
    logits = runner.execute([(r, K + 1) for r in seqs.requests], all_logits=True)
    assert logits.shape == (3 * (K + 1), VOCAB_SIZE)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    # Without all_logits the same step returns each sequence's last row only.
    last = Sequences(runner, slot)
    only_last = runner.execute([(r, K + 1) for r in last.requests])
    torch.testing.assert_close(only_last, reference[K :: K + 1], rtol=1e-5, atol=1e-5)


def test_verify_rows_mixed_with_a_decode_row(model: tuple[Path, Path]) -> None:
    """Ragged: one sequence verifies K drafts, the others decode one token; rows in batch order."""
    base, lora = model
    runner = make_runner(base)
    slot = slot_of(runner, lora)
    reference = single_steps(runner, Sequences(runner, slot))
    seqs = Sequences(runner, slot)
    a, b, c = seqs.requests
    logits = runner.execute([(a, 1), (b, K + 1), (c, 1)], all_logits=True)
    q = K + 1
    expected = torch.cat([reference[0:1], reference[q : 2 * q], reference[2 * q : 2 * q + 1]])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_verify_graph_bucket_equals_single_decode_steps(model: tuple[Path, Path]) -> None:
    """The uniform bucket's layout (3 sequences padded to 4, K + 1 tokens each) read by the graphs'
    forward gives the single steps' logits; its padding row writes no KV and has no adapter."""
    base, lora = model
    runner = make_runner(base)
    slot = slot_of(runner, lora)
    reference = single_steps(runner, Sequences(runner, slot))
    runner.graphs = runner.make_graphs(capture=False, verify_lens=(K + 1,))
    seqs = Sequences(runner, slot)
    batch = [(r, K + 1) for r in seqs.requests]
    assert runner.graphs.bucket(batch, all_logits=True) == (4 * (K + 1), 4, K + 1)
    assert runner.graphs.bucket(batch) is not None and runner.graphs.bucket(batch)[2] == 0  # an extend step
    assert runner.graphs.bucket([(r, K) for r in seqs.requests], all_logits=True) is None  # no K bucket
    logits = runner.execute(batch, all_logits=True)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    step = runner.input
    pad = slice(3 * (K + 1), 4 * (K + 1))
    assert (step.slot_mapping[pad] == -1).all() and (step.token_slots[pad] == -1).all()
    assert step.seq_lens[3] == K + 1 and step.pos[pad].tolist() == list(range(K + 1))
    assert step.query_start[:5].tolist() == [i * (K + 1) for i in range(5)]


def test_step_input_refuses_a_step_past_its_buffers(model: tuple[Path, Path]) -> None:
    base, _ = model
    runner = make_runner(base)
    req = Request("big", [0] * (runner.input.max_tokens + 1), SamplingParams(temperature=0.0))
    req.block_table = [1] * -(-req.num_tokens // BLOCK)
    with pytest.raises(ValueError, match="more than"):
        runner.execute([(req, req.num_tokens)])


@pytest.mark.gpu
def test_verify_graph_replay_equals_eager_on_gpu(model: tuple[Path, Path]) -> None:
    """Captured verify buckets (float32: exact kernels) against the eager step and the single steps."""
    base, lora = model
    runner = make_runner(base, device="cuda")
    slot = slot_of(runner, lora)
    reference = single_steps(runner, Sequences(runner, slot))
    eager = runner.execute([(r, K + 1) for r in Sequences(runner, slot).requests], all_logits=True).clone()
    runner.graphs = runner.make_graphs(verify_lens=(K + 1,))
    seqs = Sequences(runner, slot)
    replayed = runner.execute([(r, K + 1) for r in seqs.requests], all_logits=True)
    assert (4 * (K + 1), 4, K + 1, (True,) * 4) in runner.graphs.graphs and runner.graphs.replays >= 1
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replayed, reference, rtol=1e-4, atol=1e-4)
