"""How the adapter routes reach the app's object store, the served model's shapes and the event bus."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.events import listener

from app.bootstrap import demo_model_dir
from app.config import Settings
from app.errors import ApiError
from app.storage import ObjectStore, make_object_store
from app.validation import BaseModelError, BaseModelSpec, load_base_model_spec

log = logging.getLogger(__name__)

OBJECT_STORE_STATE_KEY = "adapter_object_store"
ADAPTER_DELETED = "adapter_deleted"


def object_store(app: Litestar) -> ObjectStore:
    """The app's store, made on first use so every area (uploads, completions, the sweep) shares one."""
    store: ObjectStore | None = app.state.get(OBJECT_STORE_STATE_KEY)
    if store is None:
        s: Settings = app.state.settings
        store = make_object_store(
            data_dir=s.data_dir,
            s3_bucket=s.s3_bucket,
            s3_endpoint_url=s.s3_endpoint_url,
            s3_region=s.s3_region,
            s3_access_key_id=s.s3_access_key_id,
            s3_secret_access_key=s.s3_secret_access_key,
        )
        app.state[OBJECT_STORE_STATE_KEY] = store
    return store


def base_model_dir(settings: Settings) -> Path:
    """LORAPLEX_MODEL, else where `loraplex serve` makes the demo model on first start."""
    return Path(settings.model) if settings.model else demo_model_dir(settings)


def base_model_spec(settings: Settings) -> BaseModelSpec:
    """Read per upload (a few hundred bytes), so a demo model made after start is picked up."""
    try:
        return load_base_model_spec(base_model_dir(settings))
    except BaseModelError as exc:
        log.error("adapter upload: %s", exc)
        raise ApiError(
            503,
            "The base model is not available, so adapters cannot be checked against it",
            code="model_unavailable",
        ) from None


@listener(ADAPTER_DELETED)
async def log_adapter_deleted(sha256: str, **_: Any) -> None:
    # Litestar refuses to emit an event nobody listens to; this listener also leaves a trace in the log.
    log.info("adapter content %s no longer registered", sha256[:12])
