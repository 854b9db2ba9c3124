"""One local Ray cluster for all of tests/ray (on loopback, stopped after them) and the engine tier on it:
2 CPU replicas of the demo model. Starting them costs ~45 s on 2 cores, so it happens once per session;
each module's API server (start_server with ray=True) joins the same engine tier.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import demo_model, module_database, module_s3, start_server  # noqa: F401
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 2
METRICS_PORT = free_port()  # the node's Prometheus export (Ray's metrics agent)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="session")
def ray_cluster(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # noqa: F811
    """The cluster with the engine tier deployed; yields the tier's data folder (replicas' files)."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from app.config import Settings
    from app.scaleout.cluster import deploy_engine

    # Replica processes must import this checkout's packages (the venv's editable install may be another).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=REPLICAS + 1,
        include_dashboard=False,
        namespace="loraplex",
        _node_ip_address="127.0.0.1",
        _metrics_export_port=METRICS_PORT,
        log_to_driver=False,
    )
    engine_dir = tmp_path_factory.mktemp("engine-tier")
    settings = Settings(
        data_dir=engine_dir,
        model=str(demo_model),
        device="cpu",
        max_model_len=512,
        kv_cache_bytes=8 << 20,
        engine_replicas=REPLICAS,
        engine_replica_cpus=1.0,
    )
    try:
        deploy_engine(settings)
        yield engine_dir
    finally:
        serve.shutdown()
        ray.shutdown()


def ray_settings(s3: dict[str, str]) -> dict[str, Any]:
    return {
        "ray": True,
        "engine_replicas": REPLICAS,
        "engine_replica_cpus": 1.0,
        "s3_endpoint_url": s3["endpoint_url"],
        "s3_bucket": s3["bucket"],
        "s3_region": s3["region"],
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
    }


@pytest.fixture(scope="module")
def ray_server(
    ray_cluster: Path,
    demo_model: Path,  # noqa: F811
    module_database: str,  # noqa: F811
    module_s3: dict[str, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    server = start_server(
        demo_model, tmp_path_factory.mktemp("ray-data"), module_database, **ray_settings(module_s3)
    )
    try:
        yield server
    finally:
        server.stop()


def replicas_view(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Every live replica's introspect(), as written after this call (replicas refresh a file each
    second; the handle picks replicas itself, so it cannot ask each one)."""
    from app.scaleout.cluster import live_replicas

    since = time.time()
    want = live_replicas()
    folder = (data_dir / "replica-adapters" / "replicas").resolve()
    deadline = time.monotonic() + 10
    while True:
        seen = {}
        for path in folder.glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                if path.stat().st_mtime > since:
                    info = json.loads(path.read_text())
                    seen[info["replica"]] = info
        if len(seen) >= want or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def sse_events(lines: Iterator[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
