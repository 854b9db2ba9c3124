"""engine.sampling_params: the one range check of every sampling number a client controls (no torch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.sampling_params import (
    INT64_MAX,
    MAX_N,
    MAX_STOP_STRINGS,
    SamplingParams,
    SamplingParamsError,
)

HUGE = 2**63
BAD = {
    "n": [0, -1, MAX_N + 1, HUGE, 1.5, "2", True, None],
    "max_tokens": [0, -1, HUGE, 1e308, "16", True],
    "min_tokens": [-1, HUGE, 0.5, "1", True],
    "temperature": [-1, float("nan"), float("inf"), 1e308, "1", True, None],
    "top_p": [0, -0.1, 1.01, float("nan"), 1e308, "1", True],
    "top_k": [-2, HUGE, 2**64, 1.0, "5", True],
    "min_p": [-0.1, 1.1, float("nan"), "0"],
    "seed": [1.0, float("nan"), "1", True],
    "logprobs": [-1, 21, HUGE, 1.0, True],
    "presence_penalty": [2.5, -2.5, float("nan"), float("-inf"), 1e308, "0"],
    "frequency_penalty": [2.5, -2.5, float("nan"), 1e308, "0"],
    "repetition_penalty": [0, -1, 1e-300, 1e308, float("nan"), "1"],
    "stop": [[""], [1], ["x"] * (MAX_STOP_STRINGS + 1), ["x" * 5000], {"a": 1}, 5],
    "stop_token_ids": [[-1], [HUGE], ["1"], [1.0], [True], "12", list(range(5000))],
    "ignore_eos": [1, "yes", None],
    "skip_special_tokens": [0, "no"],
    "include_stop_str_in_output": [1],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in BAD.items() for v in values])
def test_every_bad_value_is_refused_naming_its_field(field, value):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field
    assert isinstance(caught.value, ValueError) and str(caught.value).startswith(field)


def test_edges_that_are_allowed():
    p = SamplingParams(
        n=MAX_N,
        max_tokens=INT64_MAX,
        min_tokens=INT64_MAX,
        temperature=0,
        top_p=1,
        top_k=-1,
        seed=2**70,  # any integer: the sampler reduces it modulo 2**64
        stop="end",
        stop_token_ids=(1, 2),
        logprobs=20,
        presence_penalty=-2,
        repetition_penalty=100,
    )
    assert p.top_k == 0 and p.stop == ["end"] and p.stop_token_ids == [1, 2] and p.greedy
    assert SamplingParams(seed=-5).seed == -5


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert caught.value.param == "min_tokens"


def test_the_model_checks_bound_token_ids_by_the_vocabulary():
    SamplingParams(top_k=100, stop_token_ids=[99]).check_vocab(100)
    for kwargs, field in (({"top_k": 101}, "top_k"), ({"stop_token_ids": [5, 100]}, "stop_token_ids")):
        with pytest.raises(SamplingParamsError) as caught:
            SamplingParams(**kwargs).check_vocab(100)
        assert caught.value.param == field


def test_validate_catches_fields_changed_after_construction():
    p = SamplingParams()
    p.top_k = HUGE
    with pytest.raises(SamplingParamsError, match="top_k"):
        p.validate()


def test_the_public_types_import_without_torch():
    # What the project's before-stop hook checks: the API types its side of the seam with these.
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import engine.request, engine.sampling_params, engine.outputs
        from engine import SamplingParams, LoRARequest, RequestOutput, CompletionOutput
        SamplingParams(max_tokens=3)
        import app.engine_client, app.domain.completions.run  # the app's side of the seam, typed with them
        import engine.tokenizer  # the Ray API tier's tokenizer
        assert "torch" not in sys.modules
        try:
            from engine import LLM
        except ImportError as exc:
            assert "blocked: torch" in str(exc), exc
        else:
            raise AssertionError("engine.LLM needs torch: the block did not hold")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
