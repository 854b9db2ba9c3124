"""`loraplex serve | migrate | create-admin-key | demo-model`. Settings come from LORAPLEX_* variables."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from app.config import Settings, SettingsError, ensure_secret, unknown_variables


def _settings() -> Settings:
    try:
        return ensure_secret(Settings.from_env())
    except SettingsError as exc:
        raise SystemExit(f"loraplex: bad setting: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    from app.bootstrap import BootstrapError, check_schema, ensure_model, first_admin_key, migrate
    from app.logging import configure_logging
    from app.main import create_app
    from app.server import serve

    settings = _settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    if args.ray:
        settings = dataclasses.replace(settings, ray=True)
    if settings.ray and not _has_ray():
        print("loraplex: serve --ray needs Ray Serve: pip install 'loraplex[ray]'", file=sys.stderr)
        return 1
    settings.validate()
    configure_logging(settings)
    for name in unknown_variables():
        logging.getLogger("loraplex").warning("%s is set but no setting reads it (a typo?)", name)
    try:
        if settings.is_sqlite:
            # The embedded database has one writer: this process. Postgres deployments run `loraplex migrate`.
            migrate(settings)
        else:
            check_schema(settings)
        key = first_admin_key(settings)
    except BootstrapError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    if key is not None:
        print(
            "\n  Admin key (shown once; keep it safe):\n\n"
            f"    {key.key}\n\n"
            "  Lost it? `loraplex create-admin-key` makes another.\n",
            flush=True,
        )
    settings = ensure_model(settings)
    return serve(create_app(settings), settings)


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _migrate(_: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.bootstrap import migrate

    settings = _settings()
    where = _safe_url(settings.database_url or "")
    try:
        migrate(settings)
    except (SQLAlchemyError, OSError) as exc:
        # An operator needs the reason, not a traceback; the URL is shown without its password.
        print(f"loraplex: cannot migrate {where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"loraplex: database at head ({where})")
    return 0


def _create_admin_key(args: argparse.Namespace) -> int:
    from app.bootstrap import BootstrapError, create_admin_key

    try:
        key = create_admin_key(_settings(), name=args.name)
    except BootstrapError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 1
    print(key.key)
    print(f"loraplex: admin key {key.id} created; it is shown only this once", file=sys.stderr)
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    try:
        from engine.demo import write_demo_model
    except ImportError as exc:
        print(f"loraplex: the engine's demo model writer is not available: {exc}", file=sys.stderr)
        return 1
    write_demo_model(args.dir)
    print(f"loraplex: demo model written to {args.dir}")
    return 0


def _safe_url(url: str) -> str:
    # Never echo a password from the URL.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Multi-tenant LoRA serving. Settings come from LORAPLEX_* environment variables "
        "(see docs/foundation.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the API server",
        description="Run the API server. On the embedded defaults (no "
        "LORAPLEX_DATABASE_URL) the SQLite database under ./data is migrated first, "
        "and the first start prints a new admin key.",
    )
    serve.add_argument("--host", help="address to listen on (default LORAPLEX_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default LORAPLEX_PORT or 8000)")
    serve.add_argument(
        "--ray",
        action="store_true",
        help="run the engine as Ray Serve replicas (LORAPLEX_ENGINE_REPLICAS; LORAPLEX_RAY_ADDRESS joins "
        "an existing cluster, else a local one starts); see docs/scale-out.md",
    )
    serve.set_defaults(func=_serve)

    migrate = commands.add_parser(
        "migrate",
        help="upgrade the database to the latest schema",
        description="Upgrade LORAPLEX_DATABASE_URL to the latest migration.",
    )
    migrate.set_defaults(func=_migrate)

    admin = commands.add_parser(
        "create-admin-key",
        help="issue a new admin key and print it once",
        description="Issue an admin API key, print it once on stdout.",
    )
    admin.add_argument("--name", help="a label for the key (shown in listings)")
    admin.set_defaults(func=_create_admin_key)

    demo = commands.add_parser(
        "demo-model",
        help="write a tiny random model folder (for trying things out)",
        description="Write a tiny random Llama-style model with a tokenizer to DIR.",
    )
    demo.add_argument("dir", metavar="DIR", help="folder to write the model into")
    demo.set_defaults(func=_demo_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
