"""Graceful drain: on SIGTERM the server stops taking new work and finishes what it has.

`Drain.begin()` is called from the signal handler, so `/ready` (503) and new requests (503 with
`Retry-After`) see it on their very next look, while the listening socket stays open: a load balancer that
has not yet noticed gets a clear answer to retry elsewhere instead of a refused connection. `loraplex
serve`'s uvicorn server (app/server.py) waits until `active` is zero, or `LORAPLEX_SHUTDOWN_TIMEOUT` has
passed, before it closes its sockets and runs the app's shutdown (engine, usage settlement).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from app.errors import error_body

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

DRAIN_STATE_KEY = "drain"
# Seconds a refused client should wait: about as long as a load balancer takes to stop sending here.
RETRY_AFTER_SECONDS = 5
# Probes and metrics keep answering while draining (a balancer reads /ready to take us out of rotation),
# and nobody waits for them.
PASS_THROUGH = frozenset({"/health", "/ready", "/metrics"})


class Drain:
    """Whether the server is draining, and how many requests are still running."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0
        self.started_at: float | None = None

    def begin(self) -> None:
        # Only plain attribute writes: this runs inside a signal handler.
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at


def drain_of(app: Litestar) -> Drain:
    drain: Drain = app.state[DRAIN_STATE_KEY]
    return drain


async def drain_check(app: Litestar) -> str | None:
    """A /ready check: not ready as soon as the drain begins."""
    return "draining" if drain_of(app).draining else None


_REFUSAL = msgspec.json.encode(
    error_body(
        503,
        "The server is shutting down; retry the request (another instance will take it)",
        "shutting_down",
        None,
        "service_unavailable_error",
    )
)


class DrainGuard:
    """ASGI middleware: counts running HTTP requests; while draining, answers new ones 503 at once."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PASS_THROUGH:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _refuse(send)
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1


async def _refuse(send: Send) -> None:
    headers: Any = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_REFUSAL)).encode()),
        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
        # The connection goes too: the next request on it belongs on another instance.
        (b"connection", b"close"),
    ]
    start: Any = {"type": "http.response.start", "status": 503, "headers": headers}
    await send(start)
    body: Any = {"type": "http.response.body", "body": _REFUSAL}
    await send(body)
