"""Servers for the reliability suite: the e2e machinery (tests/e2e/conftest.py) on PostgreSQL + Redis and
on SQLite, plus a `loraplex serve` subprocess that a test may kill -9 and start again.

- `pg_server`, `sqlite_server`: a module's in-process server (uvicorn in a thread, demo model on CPU).
- `ServeProcess`: `loraplex serve` in a child process on loopback, with the environment a test gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

# Fixtures reused from the e2e suite (imported here so pytest registers them for this package).
from tests.e2e.conftest import (  # noqa: F401
    ADMIN,
    REDIS_URL,
    TEST_ADMIN_KEY,
    TEST_SECRET,
    LiveServer,
    demo_model,
    module_database,
    read_usage,
    start_server,
)
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout} s")


def execute(database_url: str, statement: str) -> None:
    """One statement on the server's database, from outside (to make time pass for the sweepers)."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split(":///", 1)[1], timeout=30) as conn:
            conn.execute(statement)
        return
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def pg_server(
    demo_model: Path,  # noqa: F811
    module_database: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """PostgreSQL + Redis, objects on local disk."""
    server = start_server(demo_model, tmp_path_factory.mktemp("data"), module_database)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sqlite_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    """The embedded shape: SQLite (migrated as `loraplex serve` does), the in-process limiter."""
    from app.db.migrate import upgrade

    data = tmp_path_factory.mktemp("data")
    url = f"sqlite+aiosqlite:///{data / 'loraplex.db'}"
    upgrade(url, "head")
    server = start_server(demo_model, data, url, redis_url=None)
    try:
        yield server
    finally:
        server.stop()


class ServeProcess:
    """`loraplex serve` in a child process (the real entry point), on a loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.port = int(env["LORAPLEX_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it while it lives
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(['serve']))"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, "server ready")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


class TcpProxy:
    """A loopback TCP proxy to a service (Redis here) that a test can cut and restore, as if the service
    went down and came back, without touching the shared service itself."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def serve_env(data_dir: Path, demo_model: Path, database_url: str, **extra: str) -> dict[str, str]:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(
        {
            "LORAPLEX_DATA_DIR": str(data_dir),
            "LORAPLEX_DATABASE_URL": database_url,
            "LORAPLEX_SECRET": TEST_SECRET,
            "LORAPLEX_ADMIN_KEY": TEST_ADMIN_KEY,
            "LORAPLEX_MODEL": str(demo_model),
            "LORAPLEX_DEVICE": "cpu",
            "LORAPLEX_MAX_MODEL_LEN": "512",
            "LORAPLEX_KV_CACHE_BYTES": str(8 << 20),
            "LORAPLEX_PORT": str(free_port()),
            "LORAPLEX_LOG_FORMAT": "json",
            "LORAPLEX_LOG_LEVEL": "WARNING",
            "LORAPLEX_REDIS_KEY_PREFIX": f"rel_{uuid.uuid4().hex[:8]}",
            **extra,
        }
    )
    return env


__all__ = [
    "ADMIN",
    "REDIS_URL",
    "ServeProcess",
    "execute",
    "read_usage",
    "serve_env",
    "wait_for",
]
