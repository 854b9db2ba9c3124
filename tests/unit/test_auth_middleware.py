"""The auth middleware is secure by default: a route without guards still needs a key, HEAD included."""

from __future__ import annotations

from litestar import Litestar, get, head
from litestar.testing import TestClient

from app.auth.authenticator import KeyAuthenticator
from app.auth.middleware import AUTHENTICATOR_STATE_KEY, auth_middleware
from app.errors import exception_handlers


@get("/unguarded", sync_to_thread=False)
def unguarded() -> dict[str, str]:
    return {"secret": "data"}


@head("/unguarded-head", sync_to_thread=False)
def unguarded_head() -> None:
    return None


@get("/public", exclude_from_auth=True, sync_to_thread=False)
def public() -> dict[str, str]:
    return {"ok": "yes"}


def _no_database():  # type: ignore[no-untyped-def]
    raise AssertionError("no key, so no database lookup")


def test_routes_need_a_key_unless_they_opt_out():
    app = Litestar(
        route_handlers=[unguarded, unguarded_head, public],
        middleware=[auth_middleware()],
        exception_handlers=exception_handlers(),
        # No database behind it: without a key there is no lookup.
        state={AUTHENTICATOR_STATE_KEY: KeyAuthenticator(_no_database, "s" * 20, None, ttl_seconds=1.0)},
    )
    with TestClient(app) as client:
        refused = client.get("/unguarded")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "missing_api_key"
        assert client.head("/unguarded-head").status_code == 401
        assert client.get("/public").json() == {"ok": "yes"}
