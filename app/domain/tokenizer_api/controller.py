"""`POST /tokenize` and `POST /detokenize` (vLLM's shape), for the base model and the caller's adapters.

Tenant-scoped like /v1: the same key and scope, and `model` resolves as in completions (another tenant's
adapter is the same 404 as a missing one). Adapters share the base model's tokenizer, so nothing is
loaded. Each call counts as one request against the tenant's requests-per-minute and concurrency limits
(taken and given back at once, no tokens); no usage row is written: nothing is generated, so nothing is
billed (docs/serving.md).
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import JSONBody

from app.auth.guards import require_scope
from app.auth.principal import Principal
from app.domain.completions import params
from app.domain.completions.body_limits import refuse_deep_json
from app.domain.completions.controller import ERROR_RESPONSES, _api_error, _bad_body, _caller, _unavailable
from app.domain.completions.run import Caller
from app.domain.completions.schemas import ChatCompletionRequest
from app.domain.completions.serving import Serving, serving_of
from app.domain.tokenizer_api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from app.engine_client import EngineUnavailable

CallerKey = NamedDependency[Principal]


async def _admitted(serving: Serving, caller: Caller, model: str) -> None:
    """404 for a model the caller may not use, 429 past its request limits; nothing stays held."""
    service = serving.service
    if model != service.engine.model_name and await service.resolve(caller.tenant_id, model) is None:
        raise params.model_not_found(model)
    limiter = serving.driver.limiter
    if limiter is None:
        return
    admission = await limiter.admit(caller.tenant, 0)
    await limiter.settle(admission, 0)
    if not admission.allowed:
        raise params.RequestError(
            429,
            admission.message,
            code="rate_limit_exceeded",
            type_="rate_limit_error",
            headers={**admission.headers, **admission.retry_after_header},
        )


class TokenizerController(Controller):
    path = ""
    tags = ("completions",)
    guards = (require_scope("completions"),)
    exception_handlers = {ValidationException: _bad_body}  # noqa: RUF012
    before_request = staticmethod(refuse_deep_json)

    @post(
        "/tokenize",
        operation_id="tokenize",
        summary="Token ids of a prompt (or chat messages) as completions would count them",
        status_code=200,
        responses=ERROR_RESPONSES,
    )
    async def tokenize(
        self, request: Request[Any, Any, Any], data: JSONBody[TokenizeRequest], principal: CallerKey
    ) -> TokenizeResponse:
        serving = serving_of(request.app)
        try:
            if (data.prompt is None) == (data.messages is None):
                raise params.invalid("prompt", "send exactly one of prompt and messages")
            await _admitted(serving, await _caller(principal), data.model)
            tokenizer = serving.service.tokenizer
            if data.messages is not None:
                chat = ChatCompletionRequest(model=data.model, messages=data.messages)
                ids = await tokenizer.apply_chat_template(params.chat_messages(chat))
            else:
                ids = await tokenizer.encode(data.prompt or "", data.add_special_tokens)
            return TokenizeResponse(count=len(ids), max_model_len=serving.engine.max_model_len, tokens=ids)
        except params.RequestError as exc:
            raise _api_error(exc) from exc
        except EngineUnavailable as exc:
            raise _unavailable(str(exc)) from exc

    @post(
        "/detokenize",
        operation_id="detokenize",
        summary="The text of token ids",
        status_code=200,
        responses=ERROR_RESPONSES,
    )
    async def detokenize(
        self, request: Request[Any, Any, Any], data: JSONBody[DetokenizeRequest], principal: CallerKey
    ) -> DetokenizeResponse:
        serving = serving_of(request.app)
        try:
            await _admitted(serving, await _caller(principal), data.model)
            params.check_tokens(data.tokens, serving.engine.vocab_size, "tokens")
            return DetokenizeResponse(prompt=await serving.service.tokenizer.decode(data.tokens))
        except params.RequestError as exc:
            raise _api_error(exc) from exc
        except EngineUnavailable as exc:
            raise _unavailable(str(exc)) from exc
