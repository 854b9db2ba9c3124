"""The API tier's own copy of the model's tokenizer, so encoding and per-token decoding never cross to a
replica. Loaded and used exactly as the engine does (engine/model_loader.py's load_tokenizer and
engine/async_engine.py's encode/decode/apply_chat_template), without importing the engine (no torch here);
tests/ray/test_equality.py compares outputs with the in-process server's."""

from __future__ import annotations

from typing import Any


class ApiTokenizer:
    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        # Never run code shipped in a model folder.
        self._tok: Any = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(t) for t in self._tok.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=False))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        ids = self._tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tok, "chat_template", None)
        return template if isinstance(template, str) else None
