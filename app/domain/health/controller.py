"""/health: the process answers. /ready: every readiness check passes (database, model); with the engine on
Ray Serve (`serve --ray`) it also says how many engine replicas are live."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from sqlalchemy import text

from app.db.session import session_maker

SERVING_STATE_KEY = "serving"  # app/domain/completions/serving.py's Serving, which holds the engine client

log = logging.getLogger(__name__)

# A readiness check returns None when fine, else a short reason shown in /ready's body.
ReadyCheck = Callable[[Litestar], Awaitable[str | None]]
READY_CHECKS_STATE_KEY = "ready_checks"


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct, omit_defaults=True):
    status: str
    checks: dict[str, str]
    engine_replicas: int | None = None  # live Ray Serve engine replicas; absent for the in-process engine


async def database_check(app: Litestar) -> str | None:
    try:
        async with session_maker(app)() as session:
            await session.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("readiness: database unreachable: %s", exc)
        return "unreachable"
    return None


@get(
    "/health",
    operation_id="health",
    summary="The process is alive",
    exclude_from_auth=True,
    tags=["operations"],
)
async def health() -> Health:
    return Health(status="ok")


@get(
    "/ready",
    operation_id="ready",
    summary="Ready to serve: database reachable (and model loaded)",
    exclude_from_auth=True,
    tags=["operations"],
)
async def ready(request: Request[Any, Any, Any]) -> Response[Readiness]:
    checks: dict[str, ReadyCheck] = request.app.state[READY_CHECKS_STATE_KEY]
    results = {name: (await check(request.app)) or "ok" for name, check in checks.items()}
    ok = all(v == "ok" for v in results.values())
    serving = request.app.state.get(SERVING_STATE_KEY)
    replicas = serving.engine.live_replicas() if serving is not None else None
    return Response(
        Readiness(status="ready" if ok else "not_ready", checks=results, engine_replicas=replicas),
        status_code=200 if ok else 503,
    )
