"""Bodies of POST /tokenize and POST /detokenize, in vLLM's shape."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from app.domain.completions.params import MAX_PROMPT_CHARS
from app.domain.completions.schemas import ChatMessage, ModelName, TokenId

# Token ids one /detokenize call decodes: a few contexts' worth, and a bounded body.
MAX_DETOKENIZE_TOKENS = 131_072


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """`prompt` (a text) or `messages` (through the chat template), exactly one of them."""

    model: ModelName
    prompt: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    tokens: Annotated[list[TokenId], Meta(max_length=MAX_DETOKENIZE_TOKENS)]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str
