"""Engine outputs -> OpenAI response bodies and SSE frames. Pure: the caller passes the token decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from app.domain.completions.schemas import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DONE_FRAME = b"data: [DONE]\n\n"
# OpenAI reports only these two; an engine "abort" never reaches a client that is still listening.
_FINISH = {"stop": "stop", "length": "length"}

Decode = Callable[[int], str]
# JSON has no -inf; vLLM reports this value for a token the engine did not return a logprob for.
_MISSING_LOGPROB = -9999.0


def sse_frame(body: msgspec.Struct | dict[str, object]) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def sse_error(message: str, type_: str, code: str | None = None) -> bytes:
    """An error after the stream started: the status line is already sent, so it travels as an event."""
    return sse_frame({"error": {"message": message, "type": type_, "param": None, "code": code}})


def finish_reason(engine_reason: str | None) -> str | None:
    if engine_reason is None:
        return None
    return _FINISH.get(engine_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=max(cached_tokens, 0)),
    )


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[dict[int, float]],
    top_n: int,
    decode: Decode,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists, top_logprobs keyed by token text."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    for tid, entry in zip(token_ids, entries, strict=False):
        text = decode(tid)
        tokens.append(text)
        token_lps.append(entry.get(tid, _MISSING_LOGPROB))
        tops.append({decode(t): lp for t, lp in _top(entry, top_n)} if top_n else {})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_lps, top_logprobs=tops if top_n else None, text_offset=offsets
    )


def chat_logprobs(
    token_ids: Sequence[int], entries: Sequence[dict[int, float]], top_n: int, decode: Decode
) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries, strict=False):
        text = decode(tid)
        content.append(
            TokenLogprob(
                token=text,
                logprob=entry.get(tid, _MISSING_LOGPROB),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=decode(t), logprob=lp, bytes=list(decode(t).encode()))
                    for t, lp in _top(entry, top_n)
                ],
            )
        )
    return ChatLogprobs(content=content)
