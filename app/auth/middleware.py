"""Every route needs a key unless its handler says `exclude_from_auth=True` (health, schema, metrics).

Secure by default: a new route that forgets its guard still rejects anonymous callers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware

from app.auth.authenticator import KeyAuthenticator, unauthorized
from app.logging import request_context

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection

AUTHENTICATOR_STATE_KEY = "authenticator"


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return token


class ApiKeyAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        authenticator: KeyAuthenticator = connection.app.state[AUTHENTICATOR_STATE_KEY]
        principal = await authenticator.authenticate(bearer_token(connection))
        ctx = request_context.get()
        if ctx is not None:
            ctx.tenant_id = str(principal.tenant_id) if principal.tenant_id else None
            ctx.key_id = str(principal.key_id) if principal.key_id else None
        return AuthenticationResult(user=principal, auth=None)


def auth_middleware() -> DefineMiddleware:
    # The OpenAPI schema is public: it documents, it does not serve data. Only OPTIONS (CORS preflight)
    # skips the key, stated here so that a change of Litestar's default cannot open HEAD or others.
    return DefineMiddleware(
        ApiKeyAuthMiddleware,
        exclude_from_auth_key="exclude_from_auth",
        exclude=["^/schema"],
        exclude_http_methods=["OPTIONS"],
    )
