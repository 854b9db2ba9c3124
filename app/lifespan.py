"""Background work of the foundation that lives as long as the app: writing keys' `last_used_at`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from app.auth.authenticator import KeyAuthenticator
from app.auth.middleware import AUTHENTICATOR_STATE_KEY
from app.config import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def last_used_writer(app: Litestar) -> AsyncIterator[None]:
    """Flush last_used_at every few seconds instead of writing on every request."""
    authenticator: KeyAuthenticator = app.state[AUTHENTICATOR_STATE_KEY]
    settings: Settings = app.state.settings
    interval = settings.last_used_flush_seconds

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            await authenticator.flush_last_used()

    task = asyncio.create_task(loop(), name="loraplex-last-used")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await authenticator.flush_last_used()
