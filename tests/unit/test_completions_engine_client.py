"""LocalEngineClient's readiness rules (what /ready says about the engine), over an engine-shaped object."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from app.engine_client import EngineUnavailable, LocalEngineClient
from engine.config import EngineConfig


def client(model: str | None = "m", stall_seconds: float = 30.0) -> LocalEngineClient:
    return LocalEngineClient(
        None if model is None else EngineConfig(model=model), stall_seconds=stall_seconds
    )


def loaded(c: LocalEngineClient, **state: object) -> LocalEngineClient:
    fields = {"is_healthy": True, "dead_error": None, "last_tick": time.monotonic(), "model_name": "m"}
    c._engine = SimpleNamespace(**{**fields, **state})
    return c


def test_not_ready_until_loaded_and_ready_when_ticking() -> None:
    assert client().readiness() == (False, "model loading")
    assert loaded(client()).readiness() == (True, "ok")
    assert loaded(client()).model_name == "m"


def test_each_reason_is_reported_and_refuses_requests() -> None:
    cases = [
        (client(model=None), "no model configured"),
        (
            loaded(client(), is_healthy=False, dead_error="RuntimeError: boom"),
            "engine dead: RuntimeError: boom",
        ),
        (loaded(client(stall_seconds=5), last_tick=time.monotonic() - 60), "has not ticked"),
    ]
    failed = client()
    failed._load_error = "OSError: no config.json"
    cases.append((failed, "model failed to load: OSError"))
    for c, reason in cases:
        ready, text = c.readiness()
        assert not ready and reason in text
        with pytest.raises(EngineUnavailable, match=reason.split(":")[0]):
            _ = c.engine
