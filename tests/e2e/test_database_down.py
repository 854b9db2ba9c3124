"""PostgreSQL going away under a live server: new completions are 503s (never 500s, never unmetered), a
stream in flight still finishes for its client, and its usage is written once when the database is back."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import LiveServer, free_port, start_server

LONG = {
    "model": "demo-model",
    "prompt": "Once upon a time",
    "max_tokens": 300,
    "temperature": 0,
    "ignore_eos": True,
}


class Outage:
    """A TCP relay in front of PostgreSQL that can go down: open connections are cut and new ones refused,
    which is what the app sees when the database host dies."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._listen()

    def _listen(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        assert self._listener is not None
        # shutdown() first: a bare close() does not wake the thread blocked in accept(), which would
        # then go on accepting.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def up(self) -> None:
        if self._listener is None:
            self._listen()


@pytest.fixture(scope="module")
def outage(module_database: str) -> Outage:
    return Outage(int(module_database.split("@", 1)[1].split("/", 1)[0].split(":")[1]))


@pytest.fixture(scope="module")
def live_server(
    demo_model: Path, module_database: str, outage: Outage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    host_port = module_database.split("@", 1)[1].split("/", 1)[0]
    via_relay = module_database.replace(host_port, f"127.0.0.1:{outage.port}")
    server = start_server(demo_model, tmp_path_factory.mktemp("data"), via_relay)
    try:
        yield server
    finally:
        outage.up()
        server.stop()


def test_database_outage_is_503_and_in_flight_usage_is_written_once_later(
    live_server: LiveServer, outage: Outage, module_database: str
) -> None:
    tenant = live_server.tenant()
    key = live_server.key(tenant["id"])
    headers = {"Authorization": f"Bearer {key}"}
    client = live_server.openai(key)
    assert client.completions.create(model="demo-model", prompt="hi", max_tokens=2).usage.total_tokens > 0
    try:
        with httpx.stream(
            "POST",
            live_server.url + "/v1/completions",
            json={**LONG, "stream": True},
            headers=headers,
            timeout=60,
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            request_id = json.loads(first[6:])["id"]
            outage.down()
            rest = [line for line in lines if line]
        # The client got its whole answer although the bill could not be written yet.
        assert rest[-1] == "data: [DONE]"
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="demo-model", prompt="hi", max_tokens=2)
        assert err.value.status_code == 503
        assert live_server.admin.get("/health").status_code == 200
        assert live_server.admin.get("/ready").status_code == 503
    finally:
        outage.up()

    def row() -> dict[str, Any] | None:
        return next((r for r in live_server.usage_rows() if r["request_id"] == request_id), None)

    deadline = time.monotonic() + 30
    while (row() or {}).get("status") != "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    settled = row()
    assert settled is not None and settled["status"] == "ok" and settled["completion_tokens"] == 300
    assert [r["request_id"] for r in live_server.usage_rows()].count(request_id) == 1
    # And the server serves again.
    assert (
        client.completions.create(model="demo-model", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    )
