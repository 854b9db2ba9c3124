"""OpenAI-compatible request and response bodies for /v1/completions, /v1/chat/completions and /v1/models.

Types and the API's own limits live in `Meta` so the OpenAPI schema states them and msgspec refuses bad
values before any handler code runs; every sampling number is then range-checked by the engine's
SamplingParams (in `params.py`, with the cross-field rules: stream_options without stream, ...), the same
checks the engine runs at its door. Unknown fields are ignored, as OpenAI-compatible servers do, because SDKs add new ones often.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from engine.sampling_params import INT64_MAX

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
TokenId = Annotated[int, Meta(ge=0)]
ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
UserTag = Annotated[str, Meta(max_length=256)]
Prompt = str | list[str | TokenId | list[TokenId]]
Stop = str | list[str] | None
# OpenAI's seed is a signed 64-bit integer; a negative one is refused (generators take unsigned seeds).
Seed = Annotated[int, Meta(ge=0, le=INT64_MAX)]
MAX_STOP_TOKEN_IDS = 64


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk carries the usage so far.
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by both endpoints, including our vLLM-style extensions (top_k, min_p, ...)."""

    model: ModelName
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=16)] = 1
    stop: Stop = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: UserTag | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: MinP | None = None
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # Refused when set: the prefix-cache salt is always the server's HMAC of the tenant id.
    cache_salt: str | None = None
    # Accepted for compatibility but refused when set to anything that changes behaviour.
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Prompt
    # 0: the prompt alone (with echo or prompt_logprobs), as vLLM and OpenAI answer it.
    max_tokens: Annotated[int, Meta(ge=0)] | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    # vLLM's: the top-k logprobs of every prompt token (the first has none).
    prompt_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, object]] | None = None
    functions: list[dict[str, object]] | None = None
    response_format: dict[str, object] | None = None


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    # null for an echoed prompt's first token, which has no context
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class PromptLogprob(msgspec.Struct, kw_only=True):
    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's shape: per prompt token (null for the first) {token id: logprob}; only when asked for.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob] | None


class AssistantMessage(msgspec.Struct, kw_only=True):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    owned_by: str
    root: str
    parent: str | None
    object: str = "model"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """Every error of the API, in OpenAI's shape."""

    error: ErrorDetail
