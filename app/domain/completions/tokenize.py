"""Tokenizing prompts off the event loop, a few at a time.

A 1 MB prompt keeps the tokenizer busy for about a second; on the event loop that is a second in which
`/health` and every running stream wait. Here tokenization runs in worker threads, at most
`TOKENIZER_THREADS` at once (a hundred huge prompts queue for them instead of starting a hundred
threads), and a prompt far longer than the context is refused after tokenizing only its beginning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from app.domain.completions import params
from app.engine_client import EngineClient

T = TypeVar("T")


def _default_threads() -> int:
    # The fast tokenizers release the GIL for most of their work, so each thread can keep a core busy:
    # leave one core to the event loop (and the engine's loop), and more than four never helped.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(4, cores - 1))


TOKENIZER_THREADS = _default_threads()
# A text longer than this many characters per context token is first tokenized only up to that length;
# when that beginning alone has twice the context's tokens, the whole cannot fit (merges across the cut
# change a count by a token or two, never by half) and the rest is never read.
PREFIX_CHARS_PER_TOKEN = 16


class Tokenizer:
    def __init__(self, engine: EngineClient, threads: int = TOKENIZER_THREADS) -> None:
        self.engine = engine
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        await self._refuse_far_too_long(text, "prompt")
        if not add_special_tokens:
            return await self._run(lambda t: self.engine.encode(t, False), text)
        return await self._run(self.engine.encode, text)

    async def decode(self, token_ids: list[int]) -> str:
        return await self._run(self.engine.decode, token_ids)

    async def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        # The template only adds tokens around the contents, so the contents alone are a lower bound.
        await self._refuse_far_too_long("\n".join(m["content"] for m in messages), "messages")
        return await self._run(self.engine.apply_chat_template, messages)

    async def _refuse_far_too_long(self, text: str, param: str) -> None:
        context = self.engine.max_model_len
        head_chars = context * PREFIX_CHARS_PER_TOKEN
        if len(text) <= head_chars:
            return
        head = await self._run(self.engine.encode, text[:head_chars])
        if len(head) >= 2 * context:
            raise params.invalid(
                param,
                f"this model's maximum context length is {context} tokens; the prompt has more than "
                f"{2 * context - 2}",
                code="context_length_exceeded",
            )

    async def _run(self, fn: Callable[[Any], T], arg: Any) -> T:
        if self._limiter is None:
            # Made on first use: a limiter belongs to the event loop that runs the app.
            self._limiter = anyio.CapacityLimiter(self.threads)
        return await anyio.to_thread.run_sync(fn, arg, limiter=self._limiter)
