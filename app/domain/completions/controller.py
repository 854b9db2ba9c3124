"""`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`: thin handlers over the service.

Errors here use OpenAI's statuses: a body that fails validation is a 400 naming the parameter (the
foundation's 422 is for the admin API), an unknown model is a 404 on `model`, a dead engine a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.response import Stream

from app.auth.guards import require_scope
from app.auth.principal import Principal
from app.domain.completions import responses
from app.domain.completions.body_errors import body_error
from app.domain.completions.body_limits import refuse_deep_json
from app.domain.completions.params import RequestError
from app.domain.completions.params import model_not_found as _model_not_found
from app.domain.completions.run import Caller, CompletionRun
from app.domain.completions.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorEnvelope,
    ModelCard,
    ModelList,
)
from app.domain.completions.serving import Serving, serving_of
from app.engine_client import EngineUnavailable
from app.errors import ApiError, error_response

CallerKey = NamedDependency[Principal]
_ERRORS = {
    400: "A parameter is invalid (`param` names it), or the prompt does not fit the context",
    401: "Missing or unknown API key",
    403: "The key lacks the `completions` scope",
    404: "No such model among the base model and your adapters",
    429: "A rate limit or quota of your tenant; see `Retry-After` and `x-ratelimit-*`",
    503: "The model is not loaded, the engine failed, the server is at capacity or draining, or usage cannot be recorded right now",
}
ERROR_RESPONSES = {
    status: ResponseSpec(data_container=ErrorEnvelope, description=text, generate_examples=False)
    for status, text in _ERRORS.items()
}
log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(Stream):
    """SSE. Litestar lets the route's media type (JSON here) win over a Stream's own; this one keeps its own."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def _api_error(exc: RequestError) -> ApiError:
    return ApiError(
        exc.status, exc.message, code=exc.code, param=exc.param, type=exc.type, headers=exc.headers
    )


def _unavailable(reason: str) -> ApiError:
    # The reason (often an exception's text) is for the operator's log, never for the client.
    log.warning("engine unavailable: %s", reason)
    return ApiError(
        503,
        "The model is not available right now; try again later.",
        code="engine_unavailable",
        headers={"Retry-After": "5"},
    )


def _bad_body(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """A body msgspec refused: OpenAI answers 400 and names the parameter (body_errors.py has the words)."""
    return error_response(body_error(exc))


async def _caller(principal: Principal) -> Caller:
    """The caller with its tenant's limits, from the key cache: a completion holds no database session
    while it waits for the engine (one held across a generation starved the pool under load)."""
    if principal.tenant_id is None or principal.limits is None:
        raise ApiError(401, "Unknown tenant", code="invalid_api_key")
    return Caller(
        tenant=principal.limits,
        tenant_id=str(principal.tenant_id),
        key_id=str(principal.key_id) if principal.key_id else None,
    )


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up. The body is already read, so the next ASGI message is that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _serve(serving: Serving, request: Request, run: CompletionRun, chat: bool) -> Any:
    driver = serving.driver
    await driver.begin(run)
    if not run.spec.stream:
        work = asyncio.ensure_future(responses.complete(driver, run, chat))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            # Nobody is waiting for this answer any more: stop the engine work (finish() aborts and settles).
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(None, status_code=499)
        try:
            body = work.result()
        except EngineUnavailable as exc:
            raise _unavailable(str(exc)) from exc
        return Response(body, headers=run.headers)
    outputs = driver.outputs(run)
    try:
        # Wait for the first output before answering, so a dead engine is still a plain 503.
        first = await outputs.__anext__()
    except (EngineUnavailable, StopAsyncIteration) as exc:
        await driver.finish(run)
        raise _unavailable(str(exc) or "no output") from exc
    except BaseException:
        await driver.finish(run)
        raise
    frames = responses.stream(driver, run, chat, outputs, first)
    # finish() is idempotent: this background call settles a run whose stream never started.
    return EventStream(
        frames,
        headers={**SSE_HEADERS, **run.headers},
        background=BackgroundTask(driver.finish, run),
    )


class CompletionsController(Controller):
    path = "/v1"
    tags = ("completions",)
    guards = (require_scope("completions"),)
    exception_handlers = {ValidationException: _bad_body}  # noqa: RUF012
    before_request = staticmethod(refuse_deep_json)

    @post(
        "/completions",
        operation_id="createCompletion",
        summary="Complete a prompt with the base model or one of your adapters",
        description="With `stream: true` the answer is `text/event-stream`: chunks of this shape, then `[DONE]`.",
        status_code=200,
        responses=ERROR_RESPONSES,
    )
    async def create_completion(
        self,
        request: Request,
        data: JSONBody[CompletionRequest],
        principal: CallerKey,
    ) -> CompletionResponse:
        serving = serving_of(request.app)
        try:
            run = await serving.service.prepare_completion(await _caller(principal), data)
            return await _serve(serving, request, run, chat=False)  # type: ignore[no-any-return]
        except RequestError as exc:
            raise _api_error(exc) from exc
        except EngineUnavailable as exc:
            raise _unavailable(str(exc)) from exc

    @post(
        "/chat/completions",
        operation_id="createChatCompletion",
        summary="Chat with the base model or one of your adapters (the tokenizer's chat template)",
        description="With `stream: true` the answer is `text/event-stream` (`chat.completion.chunk`s, `[DONE]`).",
        status_code=200,
        responses=ERROR_RESPONSES,
    )
    async def create_chat_completion(
        self,
        request: Request,
        data: JSONBody[ChatCompletionRequest],
        principal: CallerKey,
    ) -> ChatCompletionResponse:
        serving = serving_of(request.app)
        try:
            run = await serving.service.prepare_chat(await _caller(principal), data)
            return await _serve(serving, request, run, chat=True)  # type: ignore[no-any-return]
        except RequestError as exc:
            raise _api_error(exc) from exc
        except EngineUnavailable as exc:
            raise _unavailable(str(exc)) from exc

    @get(
        "/models",
        operation_id="listModels",
        summary="The base model and your adapters (`name` = current version, `name@N` = version N)",
        responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 403, 503)},
    )
    async def list_models(self, request: Request, principal: CallerKey) -> ModelList:
        return ModelList(data=await _model_cards(serving_of(request.app), str(principal.tenant_id)))

    @get(
        "/models/{model_id:str}",
        operation_id="retrieveModel",
        summary="One model: the base model or one of your adapters",
        responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 403, 404, 503)},
    )
    async def retrieve_model(self, request: Request, principal: CallerKey, model_id: str) -> ModelCard:
        cards = await _model_cards(serving_of(request.app), str(principal.tenant_id))
        card = next((c for c in cards if c.id == model_id), None)
        if card is None:
            raise _api_error(_model_not_found(model_id))
        return card


async def _model_cards(serving: Serving, tenant_id: str) -> list[ModelCard]:
    try:
        base = serving.engine.model_name
    except EngineUnavailable as exc:
        raise _unavailable(str(exc)) from exc
    cards = [ModelCard(id=base, created=int(time.time()), owned_by="loraplex", root=base, parent=None)]
    adapters = await serving.list_adapters(tenant_id)
    current = {a.name: a.version for a in adapters}  # rows come sorted by name, then version
    for adapter in adapters:
        created = int(adapter.created_at.timestamp())
        ids = [f"{adapter.name}@{adapter.version}"]
        if current[adapter.name] == adapter.version:
            ids.insert(0, adapter.name)
        cards += [ModelCard(id=i, created=created, owned_by="tenant", root=i, parent=base) for i in ids]
    return cards
