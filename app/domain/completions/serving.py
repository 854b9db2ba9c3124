"""One `Serving` per app: the engine client, the adapter disk cache and the completion service, with the
lifespan, readiness check and `adapter_deleted` listener that `create_app` registers.

Created in `create_app` (not at import), so two apps in one process (as in tests) never share an engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.events import EventListener, listener

from app.config import Settings
from app.domain.completions.adapter_files import AdapterFiles
from app.domain.completions.run import RunDriver
from app.domain.completions.service import CompletionService
from app.domain.usage.metering import database_down, db_unavailable
from app.engine_client import engine_client

log = logging.getLogger(__name__)

SERVING_STATE_KEY = "serving"


class Serving:
    def __init__(self, settings: Settings) -> None:
        assert settings.secret is not None
        self.settings = settings
        self.engine = engine_client(settings)
        self.files: AdapterFiles | None = None
        self.driver = RunDriver(self.engine, {})  # rebound to the app's state when the app starts
        self.service = CompletionService(
            self.engine, None, settings.secret, self._resolve, settings.max_prompts_per_request
        )
        self.service.tool_call_parser = settings.tool_call_parser
        self._app: Litestar | None = None
        self._session_maker: Any = None
        self._last_reason: str | None = None

    # ---- what create_app registers ----------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        self._app = app
        self.driver = RunDriver(
            self.engine, app.state, self.settings.max_num_seqs + self.settings.max_queued_requests
        )
        if self.settings.model is None:
            # `loraplex serve` always sets a model (the demo one by default); an app built without one
            # (API tests of other areas) serves the admin API only and answers /v1 calls with 503.
            log.warning("no model configured: /v1 completions are disabled")
            yield
            return
        self.files = self._adapter_files(app)
        self.service.files = self.files
        self.engine.attach_adapters(self.files)
        self.engine.start_loading()
        try:
            yield
        finally:
            await self.engine.shutdown()

    async def ready_check(self, app: Litestar) -> str | None:
        if self.settings.model is None:
            return None
        ok, reason = self.engine.readiness()
        if ok:
            return None
        # Reasons read "what: detail", the detail often an exception's text: /ready says what, the log
        # (once per new reason, since probes ask every few seconds) has the detail.
        if reason != self._last_reason:
            log.warning("engine not ready: %s", reason)
            self._last_reason = reason
        return reason.split(":", 1)[0]

    def listeners(self) -> list[EventListener]:
        @listener("adapter_deleted")
        async def on_adapter_deleted(sha256: str, **_: Any) -> None:
            # Unpinned copies go at once; a copy in use by a running request goes when it is released.
            self.engine.evict_adapter(sha256)
            if self.files is not None:
                self.files.remove(sha256)
            log.info("adapter %s evicted after deletion", sha256[:12])

        return [on_adapter_deleted]

    # ---- wiring -------------------------------------------------------------------------------------
    def _adapter_files(self, app: Litestar) -> AdapterFiles:
        from app.domain.adapters.deps import object_store
        from app.domain.adapters.service import download_adapter

        store = object_store(app)
        root = (self.settings.data_dir / "adapter-cache").resolve()
        return AdapterFiles(
            root,
            lambda adapter, dest: download_adapter(store, adapter, dest),
            max_bytes=self.settings.adapter_disk_cache_bytes,
        )

    async def list_adapters(self, tenant_id: str) -> list[Any]:
        from app.db.session import session_maker
        from app.domain.adapters.service import list_adapters

        assert self._app is not None
        async with _database(), session_maker(self._app)() as session:
            return list(await list_adapters(session, tenant_id))

    async def _resolve(self, tenant_id: str, model: str) -> Any:
        from app.db.session import session_maker
        from app.domain.adapters.service import resolve_adapter

        assert self._app is not None
        async with _database(), session_maker(self._app)() as session:
            return await resolve_adapter(session, tenant_id, model)


def serving_of(app: Litestar) -> Serving:
    serving: Serving = app.state[SERVING_STATE_KEY]
    return serving


@asynccontextmanager
async def _database() -> AsyncIterator[None]:
    """A database outage while resolving adapters is a 503 like everywhere else, whatever shape it has."""
    try:
        yield
    except Exception as exc:
        if database_down(exc):
            raise db_unavailable() from exc
        raise
