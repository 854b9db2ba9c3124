"""The drain's pieces without a network: the ASGI guard, and when the uvicorn server decides to stop."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
import uvicorn

from app.drain import Drain, DrainGuard
from app.server import DrainingServer


async def _call(guard: DrainGuard, path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await guard({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send)  # type: ignore[arg-type]
    return sent


def _guard(drain: Drain, seen: list[int]) -> DrainGuard:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(drain.active)  # what the guard counted while this request ran
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return DrainGuard(app, drain)


def test_running_requests_are_counted_and_probes_are_not() -> None:
    drain, seen = Drain(), []
    guard = _guard(drain, seen)
    asyncio.run(_call(guard, "/v1/completions"))
    asyncio.run(_call(guard, "/health"))
    assert seen == [1, 0] and drain.active == 0


def test_while_draining_new_requests_get_503_with_retry_after_and_probes_still_answer() -> None:
    drain, seen = Drain(), []
    guard = _guard(drain, seen)
    drain.begin()
    refused = asyncio.run(_call(guard, "/v1/chat/completions"))
    start, body = refused
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"5" and headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"])["error"]["code"] == "shutting_down"
    assert seen == []  # the app never saw it
    assert asyncio.run(_call(guard, "/ready"))[0]["status"] == 200


def _server(timeout: float) -> tuple[DrainingServer, Drain]:
    drain = Drain()
    return DrainingServer(uvicorn.Config(app=None), drain, timeout), drain  # type: ignore[arg-type]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_starts_the_drain_and_is_not_re_raised_at_exit(sig: int) -> None:
    server, drain = _server(30.0)
    drain.active = 3
    server.handle_exit(sig, None)
    assert drain.draining and not server.should_exit
    assert server._captured_signals == []  # uvicorn re-raises these after shutdown: exit status 0 needs none
    assert asyncio.run(server.on_tick(1)) is False  # requests still running: keep serving them
    drain.active = 0
    assert asyncio.run(server.on_tick(2)) is True and server.should_exit


def test_the_shutdown_timeout_ends_the_drain_with_requests_still_running() -> None:
    server, drain = _server(0.0)
    drain.active = 1
    server.handle_exit(signal.SIGTERM, None)
    assert asyncio.run(server.on_tick(1)) is True


def test_a_second_signal_is_uvicorns_stop_now() -> None:
    server, drain = _server(30.0)
    drain.active = 1
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and server._captured_signals == [signal.SIGTERM]
