"""Speculation counters since start, named after vLLM's Prometheus metrics. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecStats:
    num_drafts: int = 0  # vllm:spec_decode_num_drafts_total (sequences x steps that verified drafts)
    num_draft_tokens: int = 0  # vllm:spec_decode_num_draft_tokens_total
    num_accepted_tokens: int = 0  # vllm:spec_decode_num_accepted_tokens_total
    # vllm:spec_decode_num_accepted_tokens_per_pos_total{position=i}: drafts whose token i was accepted
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < drafted:
            self.accepted_per_pos.extend([0] * (drafted - len(self.accepted_per_pos)))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_pos": list(self.accepted_per_pos),
        }
