"""`loraplex serve`'s HTTP server: uvicorn, with a drain before uvicorn's own graceful shutdown.

uvicorn alone, on SIGTERM, closes its listening sockets at once and then waits for running requests: new
clients get a refused connection and `/ready` cannot say 503. Here the first SIGTERM (or Ctrl+C) only
starts the app's drain (app/drain.py); uvicorn's main loop, which ticks every 0.1 s, ends once the last
request is done or `LORAPLEX_SHUTDOWN_TIMEOUT` has passed, and uvicorn's shutdown takes over from there.
A second signal is uvicorn's usual one: stop now (a third Ctrl+C: without waiting at all).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn
from litestar import Litestar

from app.config import Settings
from app.drain import Drain, drain_of

log = logging.getLogger("loraplex.server")

# After the drain (or its timeout) uvicorn waits this long for what is left, then cancels it; a cancelled
# stream still settles its usage (the completion path's `finally`), before the app's shutdown runs.
AFTER_DRAIN_SECONDS = 2
STARTUP_FAILURE = 3  # uvicorn's own exit status when the app could not start


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.timeout = timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.drain.draining and not self.should_exit:
            # Not recorded as a captured signal, so uvicorn does not re-raise it at the end: a drained
            # server exits 0, as a process manager expects after a clean stop.
            self.drain.begin()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            elapsed = self.drain.elapsed()
            if self.drain.active == 0:
                log.info("drained in %.1fs; shutting down", elapsed)
                self.should_exit = True
            elif elapsed >= self.timeout:
                log.warning(
                    "shutdown timeout (%.0fs) reached with %d request(s) running; cutting them off",
                    self.timeout,
                    self.drain.active,
                )
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app: Litestar, settings: Settings) -> int:
    """Run until stopped; 0 after a clean stop (drained or timed out), 3 when the app did not start."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=AFTER_DRAIN_SECONDS,
    )
    server = DrainingServer(config, drain_of(app), settings.shutdown_timeout)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
