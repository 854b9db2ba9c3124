"""Serve's entry point for a deployment that Serve itself starts (a RayService, `serve run`,
`serve deploy`): `import_path: app.scaleout.entry:app_builder`. Settings come from the LORAPLEX_*
variables of the application's runtime_env; the deployment options of the Serve config (replicas,
autoscaling_config, resources) override the ones set here."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.scaleout.replica import engine_application


def app_builder(args: dict[str, Any]) -> Any:
    settings = Settings.from_env()
    config = settings.engine_config()
    if config is None:
        raise ValueError("the engine tier needs LORAPLEX_MODEL")
    return engine_application(
        config,
        (settings.data_dir / "replica-adapters").resolve(),
        settings.engine_replicas or 1,
        settings.engine_replica_gpus if settings.engine_replica_gpus is not None else 1.0,
        settings.engine_replica_cpus,
        config.max_num_seqs + settings.max_queued_requests,
    )
