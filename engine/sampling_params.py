"""Per-request sampling parameters (the fields vLLM users know), validated on construction.

These checks are the one range check of every number a client controls: the API builds its
SamplingParams from the request body and answers their errors with a 400 naming `param`, and the engine's
door (LLMEngine.add_request) runs them again, so a value that would overflow a tensor or a generator never
reaches a step. No torch here: the API imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Each sample is its own sequence in the engine; an unbounded n would let one request stall the loop.
MAX_N = 128
MIN_TEMPERATURE = 1e-5
# Sampling tensors hold these as float32 and int64: larger values overflow there, inside a step.
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 1e-3
MAX_REPETITION_PENALTY = 100.0
INT64_MAX = (1 << 63) - 1
MAX_LOGPROBS = 20
# Every stop string is searched for after every token: the API allows fewer; these bound other callers.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


class SamplingParamsError(ValueError):
    """A parameter out of its range or of the wrong type; `param` is its name (the API's field name)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SamplingParamsError(name, message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_in(x: object, low: int, high: int) -> bool:
    return _is_int(x) and low <= x <= high  # type: ignore[operator]


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _float_in(x: object, low: float, high: float) -> bool:
    return _finite(x) and low <= x <= high  # type: ignore[operator]


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (the sampled one always included)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: top-k logprobs of every prompt token (the prompt token always included; the first has none).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(
            self.stop is None or isinstance(self.stop, list | tuple), "stop", "must be a list of strings"
        )
        _require(
            self.stop_token_ids is None or isinstance(self.stop_token_ids, list | tuple),
            "stop_token_ids",
            "must be a list of integers",
        )
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1 and not isinstance(self.top_k, bool):
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Every field's type and range; raises SamplingParamsError naming the first bad one. The engine
        calls it again at its door: a dataclass can be changed after it was made."""
        _require(_int_in(self.n, 1, MAX_N), "n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        _require(
            self.max_tokens is None or _int_in(self.max_tokens, 1, INT64_MAX),
            "max_tokens",
            f"must be an integer in [1, 2**63) or None, got {self.max_tokens!r}",
        )
        _require(
            _int_in(self.min_tokens, 0, INT64_MAX),
            "min_tokens",
            f"must be an integer in [0, 2**63), got {self.min_tokens!r}",
        )
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        _require(
            _float_in(self.temperature, 0.0, MAX_TEMPERATURE),
            "temperature",
            f"must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}",
        )
        _require(
            _finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}"
        )
        _require(
            _int_in(self.top_k, 0, INT64_MAX),
            "top_k",
            f"must be -1, 0 or a positive integer below 2**63, got {self.top_k!r}",
        )
        _require(_float_in(self.min_p, 0.0, 1.0), "min_p", f"must be in [0, 1], got {self.min_p!r}")
        # Any integer seeds: the sampler reduces it modulo 2**64, what torch.Generator takes.
        _require(
            self.seed is None or _is_int(self.seed), "seed", f"must be an integer or None, got {self.seed!r}"
        )
        _require(
            len(self.stop) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
            "stop",
            f"must hold at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
        )
        _require(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
            and all(_int_in(t, 0, INT64_MAX) for t in self.stop_token_ids),
            "stop_token_ids",
            f"must hold at most {MAX_STOP_TOKEN_IDS} non-negative integers",
        )
        _require(
            self.logprobs is None or _int_in(self.logprobs, 0, MAX_LOGPROBS),
            "logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}",
        )
        _require(
            self.prompt_logprobs is None or _int_in(self.prompt_logprobs, 0, MAX_LOGPROBS),
            "prompt_logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.prompt_logprobs!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_float_in(value, -2.0, 2.0), name, f"must be in [-2, 2], got {value!r}")
        _require(
            _float_in(self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
            "repetition_penalty",
            f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}",
        )
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false")

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: token ids the sampler indexes with must be in its vocabulary."""
        _require(
            self.top_k <= vocab_size,
            "top_k",
            f"must not exceed the vocabulary size ({vocab_size}), got {self.top_k}",
        )
        bad = next((t for t in self.stop_token_ids if t >= vocab_size), None)
        _require(
            bad is None,
            "stop_token_ids",
            f"must be below the vocabulary size ({vocab_size}), got {bad}",
        )

    @property
    def greedy(self) -> bool:
        # Below this, dividing the logits by the temperature only overflows: it is argmax anyway.
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
