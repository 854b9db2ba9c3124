"""Log lines: JSON objects in production, readable lines on a terminal, both with the request context."""

from __future__ import annotations

import io
import json
import logging

from app.logging import ConsoleFormatter, JsonFormatter, RequestContext, _ContextFilter, request_context


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_ContextFilter())
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_request_and_tenant_ids():
    logger, stream = _logger(JsonFormatter())
    token = request_context.set(RequestContext(request_id="req_1", tenant_id="t-1"))
    try:
        logger.info("hello %s", "world", extra={"adapter": "a1"})
    finally:
        request_context.reset(token)
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello world"
    assert first["request_id"] == "req_1" and first["tenant_id"] == "t-1"
    assert first["adapter"] == "a1" and first["level"] == "info"
    assert "request_id" not in second


def test_json_lines_stay_one_line_with_newlines_and_exceptions():
    logger, stream = _logger(JsonFormatter())
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("failed\ninjected")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "failed\ninjected"
    assert "ValueError" in record["exception"]


def test_console_lines_are_readable():
    logger, stream = _logger(ConsoleFormatter())
    token = request_context.set(RequestContext(request_id="req_2", tenant_id=None))
    try:
        logger.warning("slow request")
    finally:
        request_context.reset(token)
    line = stream.getvalue().strip()
    assert "WARNING" in line and "slow request" in line and "request_id=req_2" in line
    assert "tenant_id" not in line  # None values are left out


def test_printable_escapes_control_characters():
    from app.logging import printable

    assert printable("/admin/tenants") == "/admin/tenants"
    assert printable("/a\nb\r\x1b[31m") == "/a\\nb\\r\\x1b[31m"
    assert "\n" not in printable("/x\n2026-01-01 INFO forged line")
    assert printable("/café") == "/café"
