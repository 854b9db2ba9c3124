"""Who drafts: the Proposer protocol and the n-gram proposer. No torch."""

from __future__ import annotations

from typing import Protocol

from engine.request import Request
from engine.spec.ngram import propose_ngram


class Proposer(Protocol):
    def propose(self, requests: list[Request], max_lens: list[int]) -> list[list[int]]:
        """Drafts for these decoding sequences (each continues request.all_token_ids), at most
        max_lens[i] tokens for request i; [] where there is none."""
        ...

    def retain(self, running: list[Request]) -> None:
        """Only these requests are running now: drop any state kept for others."""
        ...


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[Request], max_lens: list[int]) -> list[list[int]]:
        return [
            propose_ngram(r.all_token_ids, self.min_n, self.max_n, k)
            for r, k in zip(requests, max_lens, strict=True)
        ]

    def retain(self, running: list[Request]) -> None:
        pass
