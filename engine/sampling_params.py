"""Per-request sampling parameters (the fields vLLM users know), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

# Each sample is its own sequence in the engine; an unbounded n would let one request stall the loop.
MAX_N = 128
MIN_TEMPERATURE = 1e-5


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _require(
            isinstance(self.n, int) and 1 <= self.n <= MAX_N,
            "n",
            f"must be an integer in [1, {MAX_N}], got {self.n!r}",
        )
        _require(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            f"must be an integer >= 1 or None, got {self.max_tokens!r}",
        )
        _require(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            "min_tokens",
            f"must be an integer >= 0, got {self.min_tokens!r}",
        )
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        _require(
            _finite(self.temperature) and self.temperature >= 0.0,
            "temperature",
            f"must be >= 0, got {self.temperature!r}",
        )
        _require(
            _finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}"
        )
        _require(
            isinstance(self.top_k, int) and self.top_k >= 0,
            "top_k",
            f"must be -1, 0 or >= 1, got {self.top_k!r}",
        )
        _require(
            _finite(self.min_p) and 0.0 <= self.min_p <= 1.0,
            "min_p",
            f"must be in [0, 1], got {self.min_p!r}",
        )
        _require(
            self.seed is None or isinstance(self.seed, int),
            "seed",
            f"must be an integer or None, got {self.seed!r}",
        )
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "must hold non-empty strings")
        _require(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must hold non-negative integers",
        )
        _require(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            "logprobs",
            f"must be an integer in [0, 20] or None, got {self.logprobs!r}",
        )
        _require(
            _finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty!r}",
        )
        _require(
            _finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty!r}",
        )
        _require(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0.0,
            "repetition_penalty",
            f"must be > 0, got {self.repetition_penalty!r}",
        )

    @property
    def greedy(self) -> bool:
        # Below this, dividing the logits by the temperature only overflows: it is argmax anyway.
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x and abs(x) != float("inf")
