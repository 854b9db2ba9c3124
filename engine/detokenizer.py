"""Incremental detokenization with stop strings.

Tokens are decoded in a short sliding window (a few tokens of context before the new ones), because many
tokenizers only know how to place a space or finish a multi-byte character from their neighbours. Text
that ends in an incomplete UTF-8 character (U+FFFD) is held back until the next token completes it, and
the last (longest stop string - 1) characters are held back while streaming, so a client never receives
the start of a stop string that later turns out to end the output.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from engine.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def make_decode(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text, as tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces=False).

    For a transformers fast tokenizer whose class keeps the library's own decode, that is exactly the
    Rust tokenizer's decode, so we call it directly: the Python layers around it (argument conversion,
    kwargs) cost ~10x the decode itself, twice per generated token. Any other tokenizer goes the long way.
    """
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)

    def decode(ids: list[int]) -> str:
        return str(
            tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        )

    return decode


def _plain_backend(tokenizer: Any) -> Any:
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not PreTrainedTokenizerFast._decode:
        return None  # a subclass with its own decoding: only its decode knows what it does
    return getattr(tokenizer, "_tokenizer", None)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self._decode = make_decode(tokenizer, params.skip_special_tokens)
        self.stop = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._before: str | None = None  # decoded [prefix, read) window, kept while it stays put
        self.text = ""
        self._sent = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def sent_text(self) -> str:
        return self.text[: self._sent]

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the stop string that now ends the text, if any; the text
        is then cut before it (or after it with include_stop_str_in_output). check_stop=False while
        min_tokens is not reached yet: stop strings in that text never end the output."""
        ids = self._ids
        ids.append(token_id)
        before = self._before
        if before is None:  # the window [prefix, read) only moves when text comes out
            before = self._before = self._decode(ids[self._prefix_offset : self._read_offset])
        now = self._decode(ids[self._prefix_offset :])
        if len(now) <= len(before) or now.endswith(_REPLACEMENT):
            return None  # nothing printable yet, or a multi-byte character still incomplete
        start = len(self.text)
        self.text += now[len(before) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        self._before = None
        return self._check_stop(start) if check_stop and self.stop else None

    def _check_stop(self, new_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            # A match must end in the new text, but may start in text from earlier tokens.
            idx = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        self._sent = min(self._sent, len(self.text))
        return stop

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet. While streaming, a possible stop-string prefix at the end waits."""
        end = len(self.text) if finished else max(self._sent, len(self.text) - self._hold)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
