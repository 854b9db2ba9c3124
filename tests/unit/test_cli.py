"""`loraplex` CLI: help for every command, clear failures for bad settings, migrate and admin keys on SQLite."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.bootstrap import first_admin_key
from app.cli import _safe_url, build_parser, main
from app.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [[], ["serve"], ["migrate"], ["create-admin-key"], ["demo-model"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loraplex")
    if command == ["serve"]:
        assert "--host" in out and "--port" in out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["launch"])
    assert exit_.value.code == 2


def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0
    for name in ["serve", "migrate", "create-admin-key", "demo-model"]:
        assert name in done.stdout


def test_bad_setting_stops_with_its_name(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_PORT", "eighty")
    with pytest.raises(SystemExit) as exit_:
        main(["migrate"])
    assert "LORAPLEX_PORT" in str(exit_.value.code)


def _count_admin_keys(url: str) -> int:
    async def run() -> int:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return int(
                    (await conn.execute(text("SELECT count(*) FROM api_keys WHERE kind='admin'"))).scalar()
                )
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_migrate_then_admin_keys_on_sqlite(monkeypatch, tmp_path, capsys):
    for name in [n for n in __import__("os").environ if n.startswith("LORAPLEX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 0
    assert "database at head" in capsys.readouterr().out
    settings = Settings.from_env()
    url = settings.database_url
    assert url is not None

    # First start: a key is made; a later start makes none.
    from app.config import ensure_secret

    settings = ensure_secret(settings)
    first = first_admin_key(settings)
    assert first is not None and first.key.startswith("lpx_")
    assert first_admin_key(settings) is None
    assert _count_admin_keys(url) == 1

    # create-admin-key prints a new key once, on stdout only.
    assert main(["create-admin-key", "--name", "ops"]) == 0
    captured = capsys.readouterr()
    printed = captured.out.strip()
    assert printed.startswith("lpx_") and printed != first.key
    assert printed not in captured.err
    assert _count_admin_keys(url) == 2


def test_admin_key_setting_skips_generation(tmp_path):
    settings = Settings.from_env(
        {
            "LORAPLEX_DATA_DIR": str(tmp_path),
            "LORAPLEX_ADMIN_KEY": "lpx_operator_chosen_key_123",
            "LORAPLEX_SECRET": "s" * 20,
        }
    )
    assert first_admin_key(settings) is None  # no database touched: it does not even exist


def test_create_admin_key_without_migrations_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LORAPLEX_DATABASE_URL", raising=False)
    assert main(["create-admin-key"]) == 1
    assert "loraplex migrate" in capsys.readouterr().err


def test_urls_are_printed_without_passwords():
    assert _safe_url("postgresql+asyncpg://user:hunter2@db:5432/x") == "postgresql+asyncpg://***@db:5432/x"
    assert _safe_url("sqlite+aiosqlite:///data/x.db") == "sqlite+aiosqlite:///data/x.db"


def test_parser_has_the_documented_commands():
    parser = build_parser()
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9001"])
    assert (args.host, args.port) == ("0.0.0.0", 9001)
    assert parser.parse_args(["demo-model", "/tmp/m"]).dir == "/tmp/m"


def test_migrate_reports_an_unreachable_database_without_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", "postgresql+asyncpg://user:hunter2@127.0.0.1:1/nowhere")
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "cannot migrate postgresql+asyncpg://***@127.0.0.1:1/nowhere" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_create_admin_key_reports_an_unreachable_database(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", "postgresql+asyncpg://user:hunter2@127.0.0.1:1/nowhere")
    assert main(["create-admin-key"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the admin key" in err and "hunter2" not in err


def test_demo_model_command_and_the_embedded_model(tmp_path, capsys):
    from app.bootstrap import ensure_model

    assert main(["demo-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    # serve's embedded default: no LORAPLEX_MODEL -> the demo model under data_dir, made once.
    settings = Settings.from_env({"LORAPLEX_DATA_DIR": str(tmp_path / "data")})
    resolved = ensure_model(settings)
    assert resolved.model == str((tmp_path / "data" / "demo-model").resolve())
    assert (Path(resolved.model) / "model.safetensors").is_file()
    configured = Settings.from_env(
        {"LORAPLEX_DATA_DIR": str(tmp_path / "x"), "LORAPLEX_MODEL": "/models/llama"}
    )
    assert ensure_model(configured).model == "/models/llama"
    assert not (tmp_path / "x").exists()
