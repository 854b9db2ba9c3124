"""docker/rayservice.yaml, checked without a Kubernetes cluster: it parses, its Serve config passes Ray
Serve's own schema, and it names what the code deploys (application, deployment, entry point, Ray)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "docker" / "rayservice.yaml"


def test_rayservice_manifest_matches_the_engine_tier() -> None:
    ray = pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from app.scaleout.replica import APP_NAME, DEPLOYMENT_NAME

    doc = yaml.safe_load(MANIFEST.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    assert spec["rayClusterConfig"]["rayVersion"] == ray.__version__  # the version pyproject pins
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.name == APP_NAME and app.route_prefix is None
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    (deployment,) = app.deployments
    assert deployment.name == DEPLOYMENT_NAME
    scaling = deployment.autoscaling_config
    assert scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]
    workers = spec["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(
        int(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        * w["maxReplicas"]
        for w in workers
    )
    assert gpus >= scaling["max_replicas"] * deployment.ray_actor_options.num_gpus


def test_plain_serve_never_imports_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from app.cli import build_parser; from app.main import create_app; "
        "from app.config import Settings; "
        f"create_app(Settings(secret='x' * 20, model='m', database_url='sqlite+aiosqlite:///{tmp_path}/db')); "
        "assert build_parser().parse_args(['serve', '--ray']).ray; "
        "assert not build_parser().parse_args(['serve']).ray; "
        "print('ray' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
