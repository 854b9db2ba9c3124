"""LLMEngine.add_request checks again what the API checked: a bad request fails alone, before it runs."""

from __future__ import annotations

import dataclasses

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.sampling_params import SamplingParamsError
from tests.helpers.hf_models import make_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    base = make_tiny_model(tmp_path_factory.mktemp("door") / "base", "llama")
    config = EngineConfig(model=str(base), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
    return LLMEngine.from_config(config)


def changed(**fields: object) -> SamplingParams:
    """Params made valid, then changed: what a caller that skips the constructor's checks would send."""
    params = SamplingParams(max_tokens=4)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (changed(top_k=2**63), "top_k"),  # used to kill the loop: "Overflow when unpacking long long"
        (changed(temperature=float("nan")), "temperature"),
        (changed(repetition_penalty=1e308), "repetition_penalty"),
        (changed(n=10**6), "n"),
        (changed(stop_token_ids=[2**63]), "stop_token_ids"),
        (changed(ignore_eos="no"), "ignore_eos"),
        (SamplingParams(top_k=10**6), "top_k"),  # beyond the vocabulary
        (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_bad_params_are_refused_at_the_door(engine, params, param):
    with pytest.raises(SamplingParamsError) as caught:
        engine.add_request("r", [0, 5], params)
    assert caught.value.param == param
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": {"max_tokens": 4}}, "SamplingParams"),
        ({"lora": "adapter-name"}, "LoRARequest"),
        ({"cache_salt": 5}, "cache_salt"),
        ({"fairness_key": ["t"]}, "fairness_key"),
    ],
)
def test_wrong_types_are_refused_at_the_door(engine, kwargs, match):
    args = {"params": SamplingParams(max_tokens=4), **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", [0, 5], **args)
    assert not engine.has_unfinished()


def test_samples_of_a_huge_seed_run(engine):
    params = SamplingParams(max_tokens=3, temperature=1.0, n=3, seed=2**64 - 1)
    engine.add_request("seeded", [0, 5], params)
    children = engine.groups["seeded"].children
    assert [c.params.seed for c in children] == [2**64 - 1 + i for i in range(3)]
    while engine.has_unfinished():
        engine.step()
    assert all(len(c.output_token_ids) == 3 for c in children)
    assert dataclasses.asdict(params)["seed"] == 2**64 - 1
