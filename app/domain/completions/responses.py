"""Running a CompletionRun to a full response body, or to SSE frames as tokens arrive."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread

from app.domain.completions import echo, render
from app.domain.completions.run import CompletionRun, RunDriver
from app.domain.completions.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from app.engine_client import EngineUnavailable
from engine.request import CompletionOutput, RequestOutput

log = logging.getLogger(__name__)


def run_usage(run: CompletionRun) -> Usage:
    return render.usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens)


async def complete(
    driver: RunDriver, run: CompletionRun, chat: bool
) -> CompletionResponse | ChatCompletionResponse:
    """Wait for the whole output. Raises EngineUnavailable (-> 503) when the engine fails meanwhile."""
    try:
        async for _ in driver.outputs(run):
            pass
    finally:
        await driver.finish(run)
    decode = driver.engine.decode_token
    if run.spec.logprobs is None and run.spec.prompt_logprobs is None:
        return _body(run, chat, decode)
    # Logprobs decode every token and each alternative one call at a time: for a long answer with n > 1
    # that is seconds of work, for a worker thread (anyio's bounded pool), not the event loop.
    return await anyio.to_thread.run_sync(_body, run, chat, decode)


def _body(run: CompletionRun, chat: bool, decode: Any) -> CompletionResponse | ChatCompletionResponse:
    outputs = [o for _, o in sorted(run.choices.items())]
    top_n = run.spec.logprobs
    if chat:
        return ChatCompletionResponse(
            id=run.request_id,
            created=run.created,
            model=run.target.model,
            choices=[
                ChatChoice(
                    index=o.index,
                    message=AssistantMessage(content=o.text),
                    logprobs=render.chat_logprobs(o.token_ids, o.logprobs or [], top_n, decode)
                    if top_n is not None
                    else None,
                    finish_reason=render.finish_reason(o.finish_reason),
                )
                for o in outputs
            ],
            usage=run_usage(run),
        )
    return CompletionResponse(
        id=run.request_id,
        created=run.created,
        model=run.target.model,
        choices=[_completion_choice(run, o, decode) for o in outputs],
        usage=run_usage(run),
    )


def _completion_choice(run: CompletionRun, o: CompletionOutput, decode: Any) -> CompletionChoice:
    """A whole completion choice: the echoed prompt (text, logprobs) before the generated part, and the
    prompt logprobs when asked for. max_tokens 0 (prompt_only): the prompt alone, finish_reason length."""
    spec, p = run.spec, o.index // run.spec.n
    ids, text = ([], "") if spec.prompt_only else (o.token_ids, o.text)
    head = run.prompt_texts[p] if spec.echo else ""
    lps: CompletionLogprobs | None = None
    if spec.logprobs is not None:
        lps = render.completion_logprobs(ids, o.logprobs or [], spec.logprobs, decode, len(head))
        if spec.echo:
            lps = echo.echo_logprobs(
                run.prompts[p], run.prompt_logprobs.get(p, []), spec.logprobs, decode, lps, len(head)
            )
    return CompletionChoice(
        index=o.index,
        text=head + text,
        logprobs=lps,
        finish_reason="length" if spec.prompt_only else render.finish_reason(o.finish_reason),
        prompt_logprobs=_prompt_part(run, p, decode),
    )


def _prompt_part(run: CompletionRun, p: int, decode: Any) -> Any:
    k = run.spec.prompt_logprobs
    if k is None:
        return None
    return echo.prompt_logprobs(run.prompt_logprobs.get(p, []), k, decode, run.prompts[p])


class StreamState:
    """Per-choice progress, so each chunk carries only what is new (text, and logprobs of new tokens)."""

    def __init__(self, n: int) -> None:
        self.tokens_sent = [0] * n
        self.text_sent = [0] * n
        self.role_sent = [False] * n
        self.finished = [False] * n
        self.head_sent = [False] * n  # echo: the prompt's part went out with the choice's first frame


def _chunk(
    run: CompletionRun, out: RequestOutput, state: StreamState, chat: bool, decode: Callable[[int], str]
) -> list[tuple[bytes, int]]:
    """The frames for one engine output, each with the number of tokens it carries."""
    frames: list[tuple[bytes, int]] = []
    top_n = run.spec.logprobs
    spec = run.spec
    pending = 0  # tokens of this output's earlier frames (continuous usage counts them too)
    for o in sorted(out.outputs, key=lambda o: o.index):
        i = o.index
        if state.finished[i]:
            continue
        if spec.prompt_only:  # the engine's one token is never shown
            o = CompletionOutput(
                index=i, text="", token_ids=[], logprobs=[], finish_reason=o.finish_reason and "length"
            )
        new_ids = o.token_ids[state.tokens_sent[i] :]
        new_lps = (o.logprobs or [])[state.tokens_sent[i] :]
        # The full text is authoritative: a stop string can trim text that an earlier delta looked ahead to.
        new_text = o.text[state.text_sent[i] :]
        reason = render.finish_reason(o.finish_reason)
        head = not chat and (spec.echo or spec.prompt_logprobs is not None) and not state.head_sent[i]
        if not new_text and reason is None and not head and not (chat and not state.role_sent[i]):
            continue
        carried = len(o.token_ids) - state.tokens_sent[i]
        state.tokens_sent[i] = len(o.token_ids)
        state.text_sent[i] = len(o.text)
        state.finished[i] = reason is not None
        if chat:
            delta = ChatDelta(content=new_text)
            if not state.role_sent[i]:
                delta.role, state.role_sent[i] = "assistant", True
            lps = render.chat_logprobs(new_ids, new_lps, top_n, decode) if top_n is not None else None
            body: Any = ChatCompletionChunk(
                id=run.request_id,
                created=run.created,
                model=run.target.model,
                choices=[ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=reason)],
            )
        else:
            p = i // spec.n
            echoed = run.prompt_texts[p] if head and spec.echo else ""
            offset = state.text_sent[i] - len(new_text) + (len(run.prompt_texts[p]) if spec.echo else 0)
            lp = (
                render.completion_logprobs(new_ids, new_lps, top_n, decode, offset)
                if top_n is not None
                else None
            )
            if lp is not None and head and spec.echo:
                lp = echo.echo_logprobs(
                    run.prompts[p], run.prompt_logprobs.get(p, []), top_n or 0, decode, lp, len(echoed)
                )
            body = CompletionResponse(
                id=run.request_id,
                created=run.created,
                model=run.target.model,
                choices=[
                    CompletionChoice(
                        index=i,
                        text=echoed + new_text,
                        logprobs=lp,
                        finish_reason=reason,
                        prompt_logprobs=_prompt_part(run, p, decode) if head else None,
                    )
                ],
            )
            state.head_sent[i] = True
        billed = 0 if spec.prompt_only else carried
        pending += billed
        if spec.continuous_usage:
            body.usage = render.usage(
                run.prompt_tokens, (run.streamed_tokens or 0) + pending, run.cached_tokens
            )
        frames.append((render.sse_frame(body), billed))
    return frames


async def _frames(
    run: CompletionRun, out: RequestOutput, state: StreamState, chat: bool, decode: Callable[[int], str]
) -> list[tuple[bytes, int]]:
    """_chunk's frames; in a worker thread while a choice's first frame still has to carry the prompt's
    logprobs (a decode per prompt token and alternative: seconds for a long prompt, never on the loop)."""
    spec = run.spec
    heavy = spec.prompt_logprobs is not None or (spec.echo and spec.logprobs is not None)
    if heavy and not chat and not all(state.head_sent):
        return await anyio.to_thread.run_sync(_chunk, run, out, state, chat, decode)
    return _chunk(run, out, state, chat, decode)


async def stream(
    driver: RunDriver,
    run: CompletionRun,
    chat: bool,
    outputs: AsyncIterator[RequestOutput],
    first: RequestOutput,
) -> AsyncIterator[bytes]:
    """SSE frames: one chunk per new piece of text, the usage chunk when asked, then `[DONE]`.

    `first` is the first item of `outputs` (driver.outputs(run)), awaited before the response started so an
    engine failure before any token is still a plain 503. A disconnect cancels this generator; `finally` settles the run.
    """
    decode = driver.engine.decode_token
    state = StreamState(run.num_choices)
    run.streamed_tokens = 0
    try:
        for frame, tokens in await _frames(run, first, state, chat, decode):
            yield frame
            run.streamed_tokens += tokens  # the server asks for the next frame once it has sent this one
        if not run.finished:
            async for out in outputs:
                for frame, tokens in await _frames(run, out, state, chat, decode):
                    yield frame
                    run.streamed_tokens += tokens
        # Settle before the last frames, so a client that reads its bill right after [DONE] finds it.
        await driver.finish(run)
        if run.spec.include_usage:
            cls: Any = ChatCompletionChunk if chat else CompletionResponse
            yield render.sse_frame(
                cls(
                    id=run.request_id,
                    created=run.created,
                    model=run.target.model,
                    choices=[],
                    usage=run_usage(run),
                )
            )
        yield render.DONE_FRAME
    except EngineUnavailable as exc:
        # The stream had started (200 sent): the failure is an error event; its cause goes to the log only.
        log.warning("stream %s: engine failed: %s", run.request_id, exc)
        yield render.sse_error(
            "The model failed while generating; try again later.",
            "service_unavailable_error",
            "engine_unavailable",
        )
    finally:
        await driver.finish(run)
