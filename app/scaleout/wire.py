"""What a replica streams back: deltas, several engine steps to a message when they pile up.

An engine RequestOutput repeats the prompt and every token so far (a snapshot). Sent as is, a stream of
n tokens would move O(n^2) data between processes; a replica sends only what changed (`Delta`), and the
API tier rebuilds the same RequestOutputs (`Rebuild`), so the completion path sees exactly what the
in-process engine gives it. A replica also sends, in one message, every output that piled up while the
previous message was on its way: under load, fewer and larger messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass(frozen=True, slots=True)
class Delta:
    choices: list[ChoiceDelta]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics | None
    error: str | None
    # The engine hands its (never changing) prompt logprobs out in some outputs: the list travels once, the
    # flag says which rebuilt outputs carry it.
    has_prompt_logprobs: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class Encode:
    """Replica side: RequestOutputs of one request -> Deltas."""

    def __init__(self) -> None:
        self._logprobs_sent: dict[int, int] = {}
        self._prompt_logprobs_sent = False

    def __call__(self, out: RequestOutput) -> Delta:
        choices = []
        for o in out.outputs:
            logprobs = None
            if o.logprobs is not None:
                sent = self._logprobs_sent.get(o.index, 0)
                logprobs = o.logprobs[sent:]
                self._logprobs_sent[o.index] = len(o.logprobs)
            choices.append(
                ChoiceDelta(
                    o.index, o.delta_text, o.delta_token_ids, logprobs, o.finish_reason, o.stop_reason
                )
            )
        has = out.prompt_logprobs is not None
        prompt_logprobs = None
        if has and not self._prompt_logprobs_sent:
            prompt_logprobs, self._prompt_logprobs_sent = out.prompt_logprobs, True
        return Delta(
            choices, out.finished, out.num_cached_tokens, out.metrics, out.error, has, prompt_logprobs
        )


class Rebuild:
    """API side: Deltas of one request -> the RequestOutputs the engine made."""

    def __init__(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._choices: dict[int, CompletionOutput] = {}
        self._prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def __call__(self, delta: Delta) -> RequestOutput:
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        outputs = []
        for d in delta.choices:
            prev = self._choices.get(d.index)
            logprobs = None
            if d.delta_logprobs is not None:
                logprobs = (prev.logprobs or [] if prev is not None else []) + d.delta_logprobs
            out = CompletionOutput(
                index=d.index,
                text=(prev.text if prev is not None else "") + d.delta_text,
                token_ids=(prev.token_ids if prev is not None else []) + d.delta_token_ids,
                delta_text=d.delta_text,
                delta_token_ids=d.delta_token_ids,
                finish_reason=d.finish_reason,
                stop_reason=d.stop_reason,
                logprobs=logprobs,
            )
            self._choices[d.index] = out
            outputs.append(out)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=delta.finished,
            num_cached_tokens=delta.num_cached_tokens,
            metrics=delta.metrics,
            prompt_logprobs=self._prompt_logprobs if delta.has_prompt_logprobs else None,
            error=delta.error,
        )
