"""Authentication (Bearer API keys) and authorization (guards on a `Principal`)."""

from app.auth.guards import require_admin, require_billing, require_scope, require_tenant
from app.auth.principal import Principal

__all__ = ["Principal", "require_admin", "require_billing", "require_scope", "require_tenant"]
