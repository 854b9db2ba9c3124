"""Guards for route handlers and controllers: `guards=[require_admin]`, `guards=[require_scope("completions")]`.

Handlers that need the caller take a `principal: Principal` parameter (an app-level dependency).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from app.auth.principal import Principal
from app.errors import ApiError

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    user = connection.scope.get("user")
    if not isinstance(user, Principal):
        # Only reachable on a route that excluded auth yet asks for a principal: a programming error.
        raise ApiError(401, "Authentication required", code="missing_api_key")
    return user


def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not principal_of(connection).is_admin:
        raise ApiError(403, "This endpoint needs an admin key", code="admin_required")


def require_tenant(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if principal_of(connection).tenant_id is None:
        raise ApiError(403, "This endpoint needs a tenant key", code="tenant_key_required")


def require_scope(scope: str) -> Guard:
    """A tenant key holding `scope` (admin keys hold no tenant scopes)."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = principal_of(connection)
        if principal.tenant_id is None or not principal.has_scope(scope):
            raise ApiError(
                403, f"This endpoint needs a tenant key with the '{scope}' scope", code="insufficient_scope"
            )

    return guard


def require_billing(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """An admin key or a tenant key with the 'billing' scope."""
    principal = principal_of(connection)
    if not (principal.is_admin or principal.has_scope("billing")):
        raise ApiError(403, "This endpoint needs an admin key or a billing key", code="insufficient_scope")


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    return principal_of(request)
