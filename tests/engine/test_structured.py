"""Constrained decoding and logit_bias on the demo model (random weights, CPU).

A random model writes valid JSON only because the grammar's mask leaves it nothing else: so every answer
here validating against its schema is the mask at work, and unconstrained neighbours in the same batch
must keep exactly the tokens they get alone.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import pytest

from engine import LLM
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.demo import DEMO_ADAPTERS
from engine.request import LoRARequest
from engine.sampling_params import MAX_SCHEMA_DEPTH, SamplingParams, SamplingParamsError, StructuredSpec
from engine.structured import GrammarCompiler, GrammarError
from tests.helpers.json_schemas import SCHEMAS

# One torch thread: the tiny model's steps are much quicker on a small, shared CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FREE_PROMPTS = [[0, 5, 6, 7], [0, 9, 3, 44, 2], [0, 17, 18]]


def schema_spec(schema: dict) -> StructuredSpec:
    return StructuredSpec("json_schema", json.dumps(schema))


@pytest.fixture(scope="module")
def llm(demo: Path) -> LLM:
    return LLM(str(demo), device="cpu", dtype="float32", max_loras=2, num_kv_blocks=256)


@pytest.fixture(scope="module")
def loras(demo: Path) -> list[LoRARequest]:
    return [LoRARequest(name, str(demo / "adapters" / name)) for name in sorted(DEMO_ADAPTERS)]


def free_params() -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def check_schemas_beside_free_rows(llm: LLM, loras: list[LoRARequest], schemas: list[dict]) -> None:
    free_loras = [None, loras[0], loras[1]]
    alone = llm.generate(FREE_PROMPTS, free_params(), lora_request=free_loras)
    prompts: list[list[int]] = []
    params: list[SamplingParams] = []
    adapters: list[LoRARequest | None] = []
    for i, schema in enumerate(schemas):
        prompts.append([0, 7 + i % 40, 3])
        params.append(SamplingParams(max_tokens=96, temperature=0.0, structured=schema_spec(schema)))
        adapters.append([None, *loras][i % 3])
    outs = llm.generate(
        prompts + FREE_PROMPTS, params + [free_params()] * 3, lora_request=adapters + free_loras
    )
    for schema, out in zip(schemas, outs, strict=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    # Unconstrained rows: the same tokens as without the constrained neighbours.
    assert [o.outputs[0].token_ids for o in outs[len(schemas) :]] == [o.outputs[0].token_ids for o in alone]


def test_fifty_schemas_validate_beside_free_rows_and_adapters(llm: LLM, loras: list[LoRARequest]) -> None:
    check_schemas_beside_free_rows(llm, loras, SCHEMAS)


def test_sampled_rows_validate_too(llm: LLM) -> None:
    picked = SCHEMAS[1::3]
    params = [
        SamplingParams(max_tokens=96, temperature=1.0, seed=i, structured=schema_spec(s))
        for i, s in enumerate(picked)
    ]
    outs = llm.generate([[0, 5, 6]] * len(picked), params)
    for schema, out in zip(picked, outs, strict=True):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_choice_regex_grammar_and_any_json(llm: LLM) -> None:
    specs = [
        StructuredSpec("choice", ("yes", "no", "maybe later")),
        StructuredSpec("regex", r"[0-9]{3}-[a-z]{2}"),
        StructuredSpec("grammar", 'start: "(" num ("," num)* ")"\nnum: /[0-9]/'),
        StructuredSpec("json"),
    ]
    outs = llm.generate(
        [[0, 5, 6]] * 4, [SamplingParams(max_tokens=48, temperature=0.0, structured=s) for s in specs]
    )
    texts = [o.outputs[0].text for o in outs]
    assert texts[0] in ("yes", "no", "maybe later")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[1])
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", texts[2]) or outs[2].outputs[0].finish_reason == "length"
    if outs[3].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(texts[3]), dict)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:2])


def test_n_samples_each_follow_the_grammar(llm: LLM) -> None:
    spec = StructuredSpec("choice", ("alpha", "beta", "gamma", "delta"))
    (out,) = llm.generate(
        [[0, 5]], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3, structured=spec)
    )
    assert [o.text in spec.value for o in out.outputs] == [True] * 4  # type: ignore[operator]


def test_a_grammar_that_does_not_end_stops_at_max_tokens(llm: LLM) -> None:
    (out,) = llm.generate(
        [[0, 5]],
        SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True, structured=StructuredSpec("regex", "[ab]+")
        ),
    )
    completion = out.outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 6
    assert re.fullmatch("[ab]+", completion.text)


def test_a_bad_schema_fails_only_its_request(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(
        "good", [0, 5, 6], SamplingParams(max_tokens=40, temperature=0.0, structured=schema_spec(SCHEMAS[5]))
    )
    for bad in (
        StructuredSpec("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}'),
        StructuredSpec("json_schema", '{"type": "wrong"}'),
        StructuredSpec("regex", "(unclosed"),
        StructuredSpec("grammar", "start: missing_rule"),
    ):
        with pytest.raises(GrammarError) as err:
            engine.add_request("bad", [0, 5], SamplingParams(max_tokens=4, structured=bad))
        assert err.value.param == "structured" and "invalid" in str(err.value)
        assert "bad" not in engine.groups
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    final = [o for o in outputs if o.finished]
    assert [o.request_id for o in final] == ["good"]
    jsonschema.validate(json.loads(final[0].outputs[0].text), SCHEMAS[5])


def test_specs_out_of_bounds_are_refused_before_compiling() -> None:
    deep: dict = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"x": deep}}
    bad = [
        StructuredSpec("json_schema", json.dumps(deep)),
        StructuredSpec("json_schema", "{" * 10),
        StructuredSpec("json_schema", '"a string"'),
        StructuredSpec("regex", "a" * 70_000),
        StructuredSpec("choice", ()),
        StructuredSpec("choice", ("x",) * 300),
        StructuredSpec("nope", "x"),
        StructuredSpec("json", "x"),
    ]
    for spec in bad:
        with pytest.raises(SamplingParamsError) as err:
            SamplingParams(structured=spec)
        assert err.value.param == "structured"


def test_compiles_are_cached_and_time_bounded(demo: Path) -> None:
    from transformers import AutoTokenizer

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(str(demo)), 512, timeout_s=30)
    spec = schema_spec(SCHEMAS[9])
    with pytest.raises(GrammarError, match="took longer than 0s"):
        compiler.compile(spec, timeout_s=0)  # the first compile also builds the tokenizer: never instant
    first = compiler.compile(spec)
    assert compiler.compile(StructuredSpec("json_schema", json.dumps(SCHEMAS[9]))) is first
    a, b = compiler.matcher(spec), compiler.matcher(spec)
    assert a.matcher is not b.matcher and a.accept(
        compiler.tokenizer.encode("{", add_special_tokens=False)[0]
    )
    assert not b.done and not b.error  # advancing one copy leaves the other alone
    bad = StructuredSpec("regex", "(")
    with pytest.raises(GrammarError):
        compiler.compile(bad)
    assert compiler.submit(bad).done()  # the failure is cached: answered at once next time
    compiler.close()


def test_mask_buffers_are_reused_in_turn_and_each_fill_is_whole(demo: Path) -> None:
    """MaskFiller fills into two host buffers used in turn (grown for a bigger batch); every row it
    returns is the matcher's full mask, whatever the buffer held before."""
    import torch
    from transformers import AutoTokenizer

    from engine.structured import MaskFiller, bitmask_width

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(str(demo)), 512, timeout_s=30)
    specs = [schema_spec(SCHEMAS[i]) for i in range(3)]
    one = torch.empty(bitmask_width(512), dtype=torch.int32)

    def alone(state) -> torch.Tensor:  # type: ignore[no-untyped-def]
        state.matcher.unsafe_compute_mask_ptr(one.data_ptr(), one.numel() * 4)
        return one.clone()

    filler = MaskFiller(512, torch.device("cpu"))
    first = filler.fill([compiler.matcher(s) for s in specs])
    first.fill_(-1)  # garbage left in buffer 0
    second = filler.fill([compiler.matcher(specs[0])])
    assert second.data_ptr() != first.data_ptr()  # the other buffer
    states = [compiler.matcher(specs[i % 3]) for i in range(70)]
    big = filler.fill(states)  # buffer 0 again, grown past its 64 rows
    assert big.shape == (70, bitmask_width(512))
    assert all(torch.equal(big[i], alone(s)) for i, s in enumerate(states))
    compiler.close()


def test_async_engine_compiles_off_the_loop_and_fails_only_that_request(demo: Path) -> None:
    config = EngineConfig(model=str(demo), device="cpu", dtype="float32", num_kv_blocks=64)

    async def run() -> None:
        engine = AsyncLLMEngine.from_config(config)
        engine.start()
        try:
            bad = SamplingParams(max_tokens=4, structured=StructuredSpec("json_schema", '{"type": 3}'))
            with pytest.raises(GrammarError):
                async for _ in engine.generate("bad", [0, 5], bad):
                    pass
            good = SamplingParams(max_tokens=64, temperature=0.0, structured=schema_spec(SCHEMAS[0]))
            outs = [o async for o in engine.generate("good", [0, 5], good)]
            assert engine.is_healthy and outs[-1].finished
            jsonschema.validate(json.loads(outs[-1].outputs[0].text), SCHEMAS[0])
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_constrained_steps_run_ahead_and_stay_valid(demo: Path) -> None:
    """A grammar row's step is launched before the host reads the tokens before it and sampled once they
    are accepted (engine/async_scheduling.py): it goes ahead, and the answer still follows the schema."""
    llm = LLM(str(demo), device="cpu", dtype="float32", num_kv_blocks=64, async_scheduling=True)
    llm.generate([[0, 5, 6]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ahead = llm.engine.num_steps_ahead
    assert ahead > 0  # unconstrained greedy decode goes ahead
    (out,) = llm.generate(
        [[0, 5, 6]], SamplingParams(max_tokens=64, temperature=0.0, structured=schema_spec(SCHEMAS[5]))
    )
    assert llm.engine.num_steps_ahead > ahead + 5
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[5])


# ---- logit_bias ----
def test_logit_bias_makes_a_token_the_argmax_and_bans_another(llm: LLM) -> None:
    prompt = [[0, 5, 6, 7]]
    (base,) = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    first = base.outputs[0].token_ids[0]
    target = (first + 100) % 512
    (pushed,) = llm.generate(
        prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={target: 100})
    )
    assert pushed.outputs[0].token_ids == [target] * 4
    (banned,) = llm.generate(
        prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={first: -100})
    )
    assert banned.outputs[0].token_ids[0] != first
    assert first not in banned.outputs[0].token_ids
    # A sampled row: a +100 bias wins every draw, and the bias also holds on the async (ahead) path.
    (drawn,) = llm.generate(
        prompt,
        SamplingParams(max_tokens=6, temperature=1.0, seed=1, ignore_eos=True, logit_bias={target: 100}),
    )
    assert drawn.outputs[0].token_ids == [target] * 6


def test_logit_bias_is_checked_at_the_door(llm: LLM) -> None:
    for bias in ({1: 101.0}, {-1: 1.0}, {1: float("nan")}, {i: 1.0 for i in range(301)}, {"1": 1.0}):
        with pytest.raises(SamplingParamsError) as err:
            SamplingParams(logit_bias=bias)  # type: ignore[arg-type]
        assert err.value.param == "logit_bias"
    with pytest.raises(ValueError, match="logit_bias"):
        llm.engine.add_request("oob", [0, 5], SamplingParams(logit_bias={10_000: 1.0}))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_on_the_gpu_masks_and_bias_apply_after_the_graphed_forward(
    demo: Path, loras: list[LoRARequest], cuda_graphs: bool
) -> None:
    """CUDA: the bitmask travels through pinned memory and masks the logits on the device, after the
    (graphed) forward; free rows beside constrained ones keep their tokens; async scheduling stays on."""
    gpu = LLM(
        str(demo), device="cuda", dtype="float32", max_loras=2, num_kv_blocks=256, cuda_graphs=cuda_graphs
    )
    free_loras = [None, loras[0], loras[1]]
    alone = gpu.generate(FREE_PROMPTS, free_params(), lora_request=free_loras)
    schemas = SCHEMAS[::2]
    params = [SamplingParams(max_tokens=96, temperature=0.0, structured=schema_spec(s)) for s in schemas]
    biased = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={300: 100})
    outs = gpu.generate(
        [[0, 5, 6]] * len(schemas) + FREE_PROMPTS + [[0, 5]],
        params + [free_params()] * 3 + [biased],
        lora_request=[None] * len(schemas) + free_loras + [None],
    )
    for schema, out in zip(schemas, outs, strict=False):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    free = outs[len(schemas) : len(schemas) + 3]
    assert [o.outputs[0].token_ids for o in free] == [o.outputs[0].token_ids for o in alone]
    assert outs[-1].outputs[0].token_ids == [300] * 4
