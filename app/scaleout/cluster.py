"""Joining (or starting) the Ray cluster and deploying the engine tier on it; used by `serve --ray`.

`LORAPLEX_RAY_ADDRESS` set: join that cluster (`ray start --head` made it, or KubeRay). Unset: start a
local one inside this process's session. The engine application is deployed only when the cluster does not
run it yet, so a RayService (docker/rayservice.yaml) or a first API instance deploys it and every other API
instance just connects. Serve's own HTTP proxy is off: the API is ours, the tier is reached by handle.
"""

from __future__ import annotations

import logging
from typing import Any

from app.config import Settings
from app.scaleout.replica import APP_NAME, DEPLOYMENT_NAME, engine_application

log = logging.getLogger(__name__)

NAMESPACE = "loraplex"


def connect(settings: Settings) -> None:
    import ray

    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False)
    else:
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)


def replica_plan(settings: Settings, cluster: dict[str, float]) -> tuple[int, float]:
    """(replicas, GPUs per replica): LORAPLEX_ENGINE_REPLICAS, else one per GPU of the cluster, or 1."""
    has_gpus = cluster.get("GPU", 0.0) >= 1.0 and settings.device != "cpu"
    gpus = settings.engine_replica_gpus
    if gpus is None:
        gpus = 1.0 if has_gpus else 0.0
    replicas = settings.engine_replicas
    if replicas is None:
        replicas = max(int(cluster.get("GPU", 0.0) // gpus), 1) if has_gpus and gpus > 0 else 1
    return replicas, gpus


def deploy_engine(settings: Settings) -> None:
    """Deploy the engine tier unless the cluster runs it already; returns once its replicas are up."""
    import ray
    from ray import serve

    config = settings.engine_config()
    if config is None:
        raise ValueError("serve --ray needs a model (LORAPLEX_MODEL)")
    connect(settings)
    if APP_NAME in serve.status().applications:
        log.info("engine tier %s already deployed; joining it", APP_NAME)
        return
    serve.start(proxy_location="Disabled")
    replicas, gpus = replica_plan(settings, ray.cluster_resources())
    app = engine_application(
        config,
        (settings.data_dir / "replica-adapters").resolve(),
        replicas,
        gpus,
        settings.engine_replica_cpus,
        config.max_num_seqs + settings.max_queued_requests,
    )
    log.info("deploying engine tier: %d replica(s), %.2g GPU(s) each", replicas, gpus)
    serve.run(app, name=APP_NAME, route_prefix=None)


def live_replicas() -> int:
    """Engine replicas Serve reports RUNNING (the API tier's /ready shows this number)."""
    from ray import serve

    app: Any = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    deployment = app.deployments.get(DEPLOYMENT_NAME)
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment is not None else 0


def shutdown_engine() -> None:
    from ray import serve

    serve.delete(APP_NAME)
