"""Turning a request group's sequences into the RequestOutput handed to callers (with streaming deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.request import CompletionOutput, Logprob, Request, RequestOutput


@dataclass(slots=True)
class Group:
    """One caller request: its n sequences, their detokenizers and what was already handed out."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    sent_tokens: list[int] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.sent_tokens = [0] * len(self.children)


def build_output(group: Group, changed: list[Request]) -> RequestOutput:
    """Outputs of the sequences in `changed` (each once, by index): cumulative text and token ids, plus
    what is new since the last output of that sequence. `finished` is True when every sequence is done."""
    if len(group.children) == 1 and changed:
        return build_single_output(group)
    return build_group_output(group, changed)


def build_single_output(group: Group) -> RequestOutput:
    """build_output for n == 1, nearly every request: it runs for every sequence on every step, so it
    skips the general path's sorting and scans over the children (tests check that both agree)."""
    only = group.children[0]
    finished = only.is_finished
    return _request_output(group, [_completion(group, only, finished)], finished, only.error or None)


def build_group_output(group: Group, changed: list[Request]) -> RequestOutput:
    outputs = [
        _completion(group, child, child.is_finished)
        for child in sorted({c.index: c for c in changed}.values(), key=lambda c: c.index)
    ]
    finished = all(c.is_finished for c in group.children)
    errors = [c.error for c in group.children if c.error]
    return _request_output(group, outputs, finished, errors[0] if errors else None)


def _request_output(
    group: Group, outputs: list[CompletionOutput], finished: bool, error: str | None
) -> RequestOutput:
    first = group.children[0]
    return RequestOutput(
        request_id=group.request_id,
        prompt_token_ids=group.prompt_token_ids,
        outputs=outputs,
        finished=finished,
        num_cached_tokens=max(first.num_cached_tokens, 0),
        metrics=first.metrics.snapshot(),  # a snapshot: other threads read outputs
        prompt=group.prompt,
        prompt_logprobs=_prompt_logprobs(group, finished),
        error=error,
    )


def _prompt_logprobs(group: Group, finished: bool) -> list[dict[int, Logprob] | None] | None:
    """The prompt logprobs in the first output after the prompt is computed, and in the last output (the
    one offline callers keep); None in the others, so a long prompt's list is not handed out every step.
    Complete lists never change again (a recompute skips known positions), so no copy is needed."""
    collected = group.children[0].prompt_logprobs
    if collected is None or len(collected) < len(group.prompt_token_ids):
        return None
    if group.prompt_logprobs_sent and not finished:
        return None
    group.prompt_logprobs_sent = True
    return collected


def _completion(group: Group, child: Request, finished: bool) -> CompletionOutput:
    detok = group.detoks[child.index]
    token_ids = child.output_token_ids  # a copy, and the step's main O(length) cost: outputs are snapshots
    sent = group.sent_tokens[child.index]
    group.sent_tokens[child.index] = len(token_ids)
    delta_text = detok.take_delta(finished=finished)
    return CompletionOutput(
        index=child.index,
        text=detok.sent_text,
        token_ids=token_ids,
        delta_text=delta_text,
        delta_token_ids=token_ids[sent:],
        finish_reason=child.finish_reason,
        stop_reason=child.stop_reason,
        logprobs=list(child.logprobs) if child.params.logprobs is not None else None,
    )
