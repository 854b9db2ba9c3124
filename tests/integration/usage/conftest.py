"""Usage tests run on a database migrated to head (which holds `usage_records`, migration 0003_usage)."""

from __future__ import annotations

import pytest


@pytest.fixture
def usage_database_url(migrated_database_url: str) -> str:
    return migrated_database_url
