"""Incremental detokenization with stop strings.

Tokens are decoded in a short sliding window (a few tokens of context before the new ones), because many
tokenizers only know how to place a space or finish a multi-byte character from their neighbours. Text
that ends in an incomplete UTF-8 character (U+FFFD) is held back until the next token completes it, and
the last (longest stop string - 1) characters are held back while streaming, so a client never receives
the start of a stop string that later turns out to end the output.
"""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self._sent = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(
                ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
            )
        )

    @property
    def sent_text(self) -> str:
        return self.text[: self._sent]

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the stop string that now ends the text, if any; the text
        is then cut before it (or after it with include_stop_str_in_output). check_stop=False while
        min_tokens is not reached yet: stop strings in that text never end the output."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        now = self._decode(self._ids[self._prefix_offset :])
        if len(now) <= len(before) or now.endswith(_REPLACEMENT):
            return None  # nothing printable yet, or a multi-byte character still incomplete
        start = len(self.text)
        self.text += now[len(before) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._check_stop(start) if check_stop else None

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
