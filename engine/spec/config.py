"""`speculative_config`: vLLM's dict shape, checked once into a frozen object. No torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    # Drafted tokens per sequence and step (k); a step verifies k + 1 query tokens.
    num_speculative_tokens: int
    # n-gram (prompt lookup): the longest suffix of [min, max] tokens that occurred before is looked up.
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # draft_model: a Hugging Face folder of a smaller model with the target's tokenizer.
    model: str | None = None
    # No speculation while more sequences than this run (None: any batch size).
    disable_by_batch_size: int | None = None
    # Adaptive switch-off (engine/spec/switch.py): below this share of accepted draft tokens, measured
    # over `window_steps` speculative steps, speculation pauses for `backoff_steps` steps (doubling while
    # it keeps failing, up to max_backoff_steps), then probes again. 0 disables the switch.
    min_acceptance_rate: float = 0.2
    window_steps: int = 2
    backoff_steps: int = 128
    max_backoff_steps: int = 1024
    # Until a window has shown that drafts are accepted (at start and after each failed window), at most
    # this many sequences draft in a step (the longest running): a probe costs little on a big batch (a
    # draft model catches up only on them). A good window lets every sequence draft.
    probe_max_seqs: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an int in [1, 16], got {k!r}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not isinstance(lo, int) or not isinstance(hi, int) or not 1 <= lo <= hi:
            raise ValueError(
                "speculative_config.prompt_lookup_min and prompt_lookup_max must be ints with "
                f"1 <= min <= max, got {lo!r} and {hi!r}"
            )
        if self.method == "draft_model" and not self.model:
            raise ValueError(
                "speculative_config.model (the draft model's folder) is required for draft_model"
            )
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config.model is only for method 'draft_model'")
        if self.disable_by_batch_size is not None and (
            not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 1
        ):
            raise ValueError(
                f"speculative_config.disable_by_batch_size must be a positive int, got {self.disable_by_batch_size!r}"
            )
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(
                f"speculative_config.min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate!r}"
            )
        for name in ("window_steps", "backoff_steps", "max_backoff_steps", "probe_max_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive int, got {value!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | None) -> SpeculativeConfig | None:
        """None or a dict (vLLM's shape) -> a checked config; unknown keys are refused by name."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative_config.{required} is required")
        return cls(**value)
