"""Cross-field checks of OpenAI request bodies, and their translation into the engine's SamplingParams.

Pure functions (engine.sampling_params imports without torch), so every refusal is a plain 400 decided
before anything reaches the engine (and before a usage row or a rate-limit token is spent). The ranges of
the sampling numbers are SamplingParams' own checks, the same ones the engine runs at its door; this
module adds only the API's own limits (stop list size, unsupported fields, cross-field rules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.domain.completions.schemas import ChatCompletionRequest, CompletionRequest, _SamplingFields
from engine.sampling_params import SamplingParams, SamplingParamsError

T = TypeVar("T")

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_PROMPT_CHARS = 1_000_000  # of one request, all its prompts together
MAX_PROMPTS = 64  # prompts in one completion request; LORAPLEX_MAX_PROMPTS_PER_REQUEST sets the server's


class RequestError(Exception):
    """An error for the client in OpenAI's envelope; `param` names the offending request field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers or {}


def invalid(param: str, message: str, code: str = "invalid_value") -> RequestError:
    return RequestError(400, message, param=param, code=code)


def model_not_found(model: str) -> RequestError:
    # Another tenant's adapter and a missing one look exactly alike: same status, same words.
    return RequestError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
        type_="not_found_error",
    )


@dataclass(frozen=True, slots=True)
class TextPrompt:
    text: str


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    token_ids: list[int]


@dataclass(slots=True)
class SamplingSpec:
    """What the engine needs besides the prompt, and how to answer.

    `params.max_tokens` is what the client asked for (None: up to the context) until `fit` sets the
    number of tokens to generate, once the prompt length is known.
    """

    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top-n logprobs to render, None when not asked for
    # The request's name for a SamplingParams field where they differ (chat's top_logprobs, ...).
    names: dict[str, str] = field(default_factory=dict)
    echo: bool = False  # completions: the prompt's text (and logprobs) before each choice's
    prompt_logprobs: int | None = None  # completions: top-k to render per prompt token
    # max_tokens 0: the answer is the prompt alone. The engine still runs the prompt (its logprobs, the
    # usage row) and makes one token, which no client sees and no bill counts.
    prompt_only: bool = False
    continuous_usage: bool = False  # every stream chunk carries the usage so far

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """What the engine computes: prompt_logprobs' top-k, or logprobs' for an echoed prompt."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    @property
    def max_tokens(self) -> int | None:
        return self.params.max_tokens

    @property
    def n(self) -> int:
        return self.params.n

    def fit(self, max_tokens: int, vocab_size: int) -> None:
        """The final params: generate `max_tokens`, and the checks that need the model's vocabulary."""
        if self.prompt_only:
            max_tokens = 1
        if self.params.min_tokens > max_tokens:
            raise invalid("min_tokens", f"min_tokens exceeds the {max_tokens} tokens left in the context")
        self.params = _engine_params(
            lambda: dataclasses.replace(
                self.params, max_tokens=max_tokens, prompt_logprobs=self.engine_prompt_logprobs
            ),
            self.names,
        )
        _engine_params(lambda: self.params.check_vocab(vocab_size), self.names)


def _engine_params(make: Callable[[], T], names: dict[str, str]) -> T:
    """`make()`, with SamplingParams' refusals as 400s naming the request's field."""
    try:
        return make()
    except SamplingParamsError as exc:
        param = names.get(exc.param, exc.param)
        raise invalid(param, str(exc)) from exc


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    for s in stops:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise invalid("stop", f"each stop sequence must have 1 to {MAX_STOP_LENGTH} characters")
    return stops


def _common(
    req: _SamplingFields, max_tokens: int | None, logprobs: int | None, names: dict[str, str]
) -> SamplingSpec:
    if req.cache_salt is not None:
        raise invalid("cache_salt", "cache_salt is set by the server from your tenant; do not send it")
    if req.logit_bias:
        raise invalid("logit_bias", "logit_bias is not supported", code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    kwargs: dict[str, Any] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "stop": _stop_list(req.stop),
        "stop_token_ids": req.stop_token_ids or [],
        "logprobs": logprobs,
    }
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "min_p": req.min_p,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        # 0 and -1 both mean "no top-k" across OpenAI-compatible servers; so does SamplingParams.
        "top_k": req.top_k,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    params = _engine_params(lambda: SamplingParams(**kwargs), names)
    spec = SamplingSpec(params, req.stream, include_usage, logprobs, names)
    spec.continuous_usage = include_usage and bool(
        req.stream_options and req.stream_options.continuous_usage_stats
    )
    return spec


def completion_spec(req: CompletionRequest) -> SamplingSpec:
    if req.max_tokens == 0 and not (req.echo or req.prompt_logprobs is not None):
        raise invalid(
            "max_tokens",
            "Invalid value for 'max_tokens': expected an integer >= 1 (0 only with echo or prompt_logprobs)",
        )
    if req.suffix:
        raise invalid("suffix", "suffix is not supported", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid("best_of", "best_of must equal n when set", code="unsupported_parameter")
    prompt_only = req.max_tokens == 0
    spec = _common(req, None if prompt_only else req.max_tokens, req.logprobs, {})
    spec.echo, spec.prompt_logprobs, spec.prompt_only = req.echo, req.prompt_logprobs, prompt_only
    return spec


def chat_spec(req: ChatCompletionRequest) -> SamplingSpec:
    if req.tools:
        raise invalid("tools", "tools are not supported", code="unsupported_parameter")
    if req.functions:
        raise invalid("functions", "functions are not supported", code="unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        # Silently answering free text to a client that asked for JSON would be worse than refusing.
        raise invalid(
            "response_format", "only response_format type 'text' is supported", code="unsupported_parameter"
        )
    both = req.max_tokens is not None and req.max_completion_tokens is not None
    if both and req.max_tokens != req.max_completion_tokens:
        raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs requires logprobs to be true")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    names = {"logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return _common(req, req.max_completion_tokens or req.max_tokens, logprobs, names)


def normalize_prompts(
    prompt: str | list[Any], max_prompts: int = MAX_PROMPTS
) -> list[TextPrompt | TokenPrompt]:
    """OpenAI's prompt forms: a string, token ids, or a list of strings or of token-id lists (one
    completion per prompt, at most `max_prompts`; all texts together at most MAX_PROMPT_CHARS)."""
    if isinstance(prompt, str):
        return [_text(prompt)]
    if not prompt:
        raise invalid("prompt", "prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [TokenPrompt(list(prompt))]
    if len(prompt) > max_prompts:
        raise invalid("prompt", f"at most {max_prompts} prompts are allowed in one request")
    out: list[TextPrompt | TokenPrompt] = []
    for i, one in enumerate(prompt):
        if isinstance(one, str):
            out.append(_text(one))
        elif isinstance(one, list) and one:
            out.append(TokenPrompt(list(one)))
        else:
            raise invalid(f"prompt[{i}]", "each prompt must be a string or a non-empty list of token ids")
    if sum(len(p.text) for p in out if isinstance(p, TextPrompt)) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"prompts are longer than {MAX_PROMPT_CHARS} characters together")
    return out


def _text(text: str) -> TextPrompt:
    if len(text) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    return TextPrompt(text)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template wants them: role + plain text content."""
    out: list[dict[str, str]] = []
    total = 0
    for i, m in enumerate(req.messages):
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            pieces = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages[{i}].content", "only text content parts are supported")
                pieces.append(part.text)
            text = "".join(pieces)
        total += len(text)
        # Chat templates predate the "developer" role; it carries the same meaning as "system".
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    if total > MAX_PROMPT_CHARS:
        raise invalid("messages", f"messages are longer than {MAX_PROMPT_CHARS} characters")
    return out


def check_tokens(token_ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    bad = next((t for t in token_ids if t >= vocab_size), None)
    if bad is not None:
        raise invalid(param, f"token id {bad} is outside the vocabulary (size {vocab_size})")


def fit_context(prompt_len: int, max_tokens: int | None, max_model_len: int, prompt_param: str) -> int:
    """The number of tokens to generate, or a 400 when prompt (+ max_tokens) exceeds the context."""
    if prompt_len == 0:
        raise invalid(prompt_param, "the prompt has no tokens")
    if prompt_len >= max_model_len:
        raise invalid(
            prompt_param,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}",
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise invalid(
            "max_tokens",
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} for the completion)",
            code="context_length_exceeded",
        )
    return max_tokens
