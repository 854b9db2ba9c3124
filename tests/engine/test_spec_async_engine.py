"""The async engine under the API with speculation: streamed chunks carry several tokens, add up to the
output without speculation, and the counters reach its stats snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import AsyncLLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.spec_helpers import ScriptedProposer, make_llm
from tests.helpers.hf_models import make_tiny_model

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [0, 17, 99, 150, 7, 31]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("spec-async") / "base", "llama")


async def test_streamed_chunks_with_several_tokens(base, one_torch_thread):
    expected = make_llm(base).generate([PROMPT], PARAMS)[0].outputs[0]
    config = EngineConfig(model=str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
                          speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                              "min_acceptance_rate": 0.0})  # fmt: skip
    eng = AsyncLLMEngine.from_config(config)
    eng.engine.spec.proposer = ScriptedProposer({(tuple(PROMPT), None, 0): expected.token_ids})
    eng.start()
    try:
        outs = [out async for out in eng.generate("r", PROMPT, PARAMS)]
        stats = eng.stats()
    finally:
        await eng.shutdown()
    final = outs[-1].outputs[0]
    assert final.token_ids == expected.token_ids and final.text == expected.text
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert max(len(o.outputs[0].delta_token_ids) for o in outs) == 4
    assert stats.spec_decode["num_accepted_tokens"] > 0
