"""Imports every model module of every area, so Alembic and the drift test see all tables.

Discovery is automatic: any module named `models` (or package `models/`) under `app/` is imported.
Put a new area's tables in `app/<...>/models.py` and they are picked up without editing this file.
"""

from __future__ import annotations

import importlib
import pkgutil

from sqlalchemy import MetaData

import app
from app.db.base import metadata


def model_modules() -> list[str]:
    found = []
    for info in pkgutil.walk_packages(app.__path__, prefix="app."):
        if info.name.rsplit(".", 1)[-1] == "models":
            found.append(info.name)
    return sorted(found)


def load_metadata() -> MetaData:
    """The metadata with every table of every area registered."""
    for name in model_modules():
        importlib.import_module(name)
    return metadata
