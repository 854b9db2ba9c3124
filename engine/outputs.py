"""Turning a request group's sequences into the RequestOutput handed to callers (with streaming deltas)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.request import CompletionOutput, Request, RequestOutput


@dataclass(slots=True)
class Group:
    """One caller request: its n sequences, their detokenizers and what was already handed out."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    sent_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sent_tokens = [0] * len(self.children)


def build_output(group: Group, changed: list[Request]) -> RequestOutput:
    """Outputs of the sequences in `changed` (each once, by index): cumulative text and token ids, plus
    what is new since the last output of that sequence. `finished` is True when every sequence is done."""
    outputs = []
    for child in sorted({c.index: c for c in changed}.values(), key=lambda c: c.index):
        detok = group.detoks[child.index]
        token_ids = child.output_token_ids
        sent = group.sent_tokens[child.index]
        group.sent_tokens[child.index] = len(token_ids)
        delta_text = detok.take_delta(finished=child.is_finished)
        outputs.append(
            CompletionOutput(
                index=child.index,
                text=detok.sent_text,
                token_ids=token_ids,
                delta_text=delta_text,
                delta_token_ids=token_ids[sent:],
                finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
                logprobs=list(child.logprobs) if child.params.logprobs is not None else None,
            )
        )
    first = group.children[0]
    errors = [c.error for c in group.children if c.error]
    return RequestOutput(
        request_id=group.request_id,
        prompt_token_ids=group.prompt_token_ids,
        outputs=outputs,
        finished=all(c.is_finished for c in group.children),
        num_cached_tokens=max(first.num_cached_tokens, 0),
        metrics=dataclasses.replace(first.metrics),  # a snapshot: other threads read outputs
        prompt=group.prompt,
        error=errors[0] if errors else None,
    )
