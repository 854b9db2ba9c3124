"""docker/: what the compose file and the image must hold (scripts/check-docker checks their syntax)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_healthchecks_and_start_order():
    services = _compose()["services"]
    assert {"postgres", "redis", "minio", "migrate", "app"} <= set(services)
    for name in ("postgres", "redis", "minio", "app"):
        assert "healthcheck" in services[name], name
    app = services["app"]
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["loraplex", "migrate"]
    assert "/ready" in " ".join(app["healthcheck"]["test"])


def test_compose_reserves_a_gpu_and_wires_the_services():
    services = _compose()["services"]
    devices = services["app"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    env = services["app"]["environment"]
    assert (
        env["LORAPLEX_DATABASE_URL"].startswith("postgresql+asyncpg://")
        and "@postgres:" in env["LORAPLEX_DATABASE_URL"]
    )
    assert env["LORAPLEX_REDIS_URL"].startswith("redis://redis:")
    assert env["LORAPLEX_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_dockerfile_builds_a_gpu_image_that_can_compile_triton_kernels():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and base.group(1).startswith("nvidia/cuda:") and "devel" in base.group(1)
    assert "build-essential" in text and "python3-dev" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text and 'CMD ["loraplex", "serve"]' in text
    assert "COPY migrations" in text  # `loraplex migrate` in the image needs them
