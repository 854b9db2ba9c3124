"""`create_app(settings)`: the Litestar application, assembled from each area's pieces.

Each area registers itself in the lists inside `create_app` (one line per list it needs); everything
else here is shared plumbing: settings, database plugin, auth, errors, logs, OpenAPI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.events import EventListener
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ControllerRouterHandler

from app.auth.authenticator import KeyAuthenticator
from app.auth.guards import provide_principal
from app.auth.middleware import AUTHENTICATOR_STATE_KEY, auth_middleware
from app.config import Settings, ensure_secret
from app.db.session import DB_CONFIG_STATE_KEY, make_db_config, make_db_plugin
from app.domain.adapters.controller import AdapterController
from app.domain.adapters.deps import log_adapter_deleted
from app.domain.adapters.sweep import adapter_sweeper
from app.domain.completions.controller import CompletionsController
from app.domain.completions.serving import SERVING_STATE_KEY, Serving
from app.domain.health.controller import READY_CHECKS_STATE_KEY, ReadyCheck, database_check, health, ready
from app.domain.keys.controller import ApiKeyController
from app.domain.tenants.controller import TenantController
from app.domain.tokenizer_api.controller import TokenizerController
from app.domain.usage.controller import admin_usage, metrics_endpoint, own_usage
from app.domain.usage.lifespan import METRICS_STATE_KEY, usage_services
from app.domain.usage.unavailable import database_unavailable_handlers
from app.drain import DRAIN_STATE_KEY, Drain, DrainGuard, drain_check
from app.errors import exception_handlers
from app.lifespan import last_used_writer
from app.logging import RequestIdMiddleware, configure_logging
from app.metrics import Metrics
from app.openapi_errors import document_errors

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = ensure_secret(settings or Settings.from_env())
    settings.validate()
    configure_logging(settings)

    # ---- Registration: each area adds one line to each list it needs. ----
    serving = Serving(settings)  # the engine and the /v1 completion path of this app
    route_handlers: list[ControllerRouterHandler] = [
        health,
        ready,
        TenantController,
        ApiKeyController,
        AdapterController,
        admin_usage,
        own_usage,
        metrics_endpoint,
        CompletionsController,
        TokenizerController,
    ]
    # Async context managers taking the app; entered in order at start, left in reverse at stop.
    lifespans: list[Lifespan] = [
        last_used_writer,
        adapter_sweeper,
        usage_services,  # limiter, metering (+ sweeper); before the engine starts taking requests
        serving.lifespan,
    ]
    # /ready runs each; a check returns None when fine or a short reason.
    ready_checks: dict[str, ReadyCheck] = {
        "database": database_check,
        "engine": serving.ready_check,
        "shutdown": drain_check,
    }
    # litestar.events listeners (`@listener("event")` functions).
    listeners: Sequence[EventListener] = [
        log_adapter_deleted,
        *serving.listeners(),
    ]
    # App-wide dependencies, available to every handler by parameter name.
    dependencies: dict[str, Provide] = {
        "settings": Provide(lambda: settings, sync_to_thread=False, use_cache=True),
        "principal": Provide(provide_principal, sync_to_thread=False),
    }
    # ---- End of registration. ----

    db_config = make_db_config(settings)
    drain = Drain()  # SIGTERM's graceful drain (app/server.py flips it; app/drain.py enforces it)
    assert settings.secret is not None
    authenticator = KeyAuthenticator(
        session_maker=db_config.create_session_maker(),
        secret=settings.secret,
        admin_key=settings.admin_key,
        ttl_seconds=settings.key_cache_ttl_seconds,
    )
    app = Litestar(
        route_handlers=route_handlers,
        plugins=[make_db_plugin(db_config)],
        middleware=[auth_middleware()],
        exception_handlers={**exception_handlers(), **database_unavailable_handlers()},
        dependencies=dependencies,
        lifespan=list(lifespans),
        listeners=list(listeners),
        openapi_config=_openapi_config(),
        on_startup=[document_errors],
        request_max_body_size=settings.max_request_bytes,
        logging_config=None,
        state=State(
            {
                "settings": settings,
                DB_CONFIG_STATE_KEY: db_config,
                AUTHENTICATOR_STATE_KEY: authenticator,
                READY_CHECKS_STATE_KEY: ready_checks,
                METRICS_STATE_KEY: Metrics(
                    lambda: serving.engine.model_name,
                    engine_stats=serving.engine.stats,
                    adapter_label_key=settings.secret,
                ),
                SERVING_STATE_KEY: serving,
                DRAIN_STATE_KEY: drain,
            }
        ),
    )
    # Outermost, so 404s, 405s and errors also get a request id and an access-log line; the drain guard
    # inside it, so a refusal during shutdown is logged too.
    app.asgi_handler = RequestIdMiddleware(DrainGuard(app.asgi_handler, drain))
    return app


def _openapi_config() -> OpenAPIConfig:
    bearer: Any = SecurityScheme(type="http", scheme="bearer", description="An API key: lpx_...")
    return OpenAPIConfig(
        title="loraplex",
        version="0.1.0",
        description="Multi-tenant LoRA serving with an OpenAI-compatible API.",
        path="/schema",
        render_plugins=[SwaggerRenderPlugin()],
        components=Components(security_schemes={"BearerAuth": bearer}),
        security=[{"BearerAuth": []}],
    )
