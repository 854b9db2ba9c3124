"""The model's tokenizer, as the engine and the API use it: load it, encode, decode, render a chat.

Torch-free: the API tier of the Ray scale-out (app/scaleout/) keeps its own copy, so encoding and
per-token decoding never cross to a replica, and the in-process AsyncLLMEngine wraps the engine's copy in
the same class, so both paths encode and render alike (tests/ray/test_equality.py compares them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    # Never run code shipped in a model folder.
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


class Tokenizer:
    def __init__(self, hf: Any) -> None:
        """hf: a Hugging Face tokenizer (load_tokenizer's)."""
        self.hf = hf

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        return cls(load_tokenizer(model_dir))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(t) for t in self.hf.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.hf.decode(token_ids, skip_special_tokens=False))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt of a chat; `tools` (OpenAI's form) are rendered by the template, if it knows how."""
        ids = self.hf.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else None
