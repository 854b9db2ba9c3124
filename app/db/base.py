"""The declarative base every model uses.

advanced-alchemy's `UUIDAuditBase` gives a UUID primary key `id` plus `created_at`/`updated_at`
(timezone-aware, UTC) and a naming convention for constraints, so migrations name them predictably.
"""

from __future__ import annotations

from advanced_alchemy.base import BigIntAuditBase, UUIDAuditBase, UUIDBase, orm_registry

metadata = orm_registry.metadata

__all__ = ["BigIntAuditBase", "UUIDAuditBase", "UUIDBase", "metadata"]
