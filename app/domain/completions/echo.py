"""What completions show of the prompt: `echo` (its text, and with `logprobs` its tokens' logprobs,
before each choice's) and vLLM's `prompt_logprobs`. Pure, like render.py: the caller passes the decoder."""

from __future__ import annotations

from collections.abc import Sequence

from app.domain.completions.render import Decode
from app.domain.completions.schemas import CompletionLogprobs, PromptLogprob
from engine.request import Logprob

PromptLogprobs = Sequence[dict[int, Logprob] | None]


def prompt_logprobs(
    entries: PromptLogprobs, top_k: int, decode: Decode, ids: Sequence[int]
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's shape: per prompt token, {token id: {logprob, rank, decoded_token}} for the prompt token and
    the top-k (the engine may hold more when logprobs asked for more than prompt_logprobs)."""
    out: list[dict[str, PromptLogprob] | None] = []
    for tid, entry in zip(ids, entries, strict=False):
        if entry is None:
            out.append(None)
            continue
        kept = {t: e for t, e in entry.items() if t == tid or e.rank <= top_k}
        out.append(
            {
                str(t): PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=decode(t))
                for t, e in kept.items()
            }
        )
    return out


def echo_logprobs(
    ids: Sequence[int],
    entries: PromptLogprobs,
    top_n: int,
    decode: Decode,
    generated: CompletionLogprobs | None,
    text_len: int,
) -> CompletionLogprobs:
    """The legacy logprobs of an echoed prompt (null for its first token), then the generated ones'.
    A prompt token's text_offset is the length of the tokens' texts before it, at most the echoed text's
    length `text_len` (special tokens such as BOS are among the tokens but not in the echoed text)."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for tid, entry in zip(ids, entries, strict=False):
        text = decode(tid)
        tokens.append(text)
        offsets.append(min(offset, text_len))
        offset += len(text)
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(entry[tid].logprob if tid in entry else None)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_n]
        tops.append({decode(t): e.logprob for t, e in ranked} if top_n else {})
    head = CompletionLogprobs(
        tokens=tokens, token_logprobs=lps, top_logprobs=tops if top_n else None, text_offset=offsets
    )
    if generated is None:
        return head
    return CompletionLogprobs(
        tokens=head.tokens + generated.tokens,
        token_logprobs=head.token_logprobs + generated.token_logprobs,
        top_logprobs=(head.top_logprobs or []) + (generated.top_logprobs or []) if top_n else None,
        text_offset=head.text_offset + generated.text_offset,  # already past the prompt's text
    )
