"""Structured logging: one line per record, as text or as JSON.

:func:`configure` installs one handler on the root logger, writing to
standard error (standard output stays free for command output such as
``--json``). Every line carries the saga id and correlation id when they are
known, so one search follows an instance across processes. They come from
either of two places:

- :func:`bound`, a context manager that binds them for the current thread
  (or task) through :mod:`contextvars`; step code uses
  ``with bound(ctx.saga_id, ctx.correlation_id): ...``;
- ``extra={"saga_id": ..., "correlation_id": ...}`` on a single call.

A JSON line looks like::

    {"time": "2026-11-25T19:06:35.123Z", "level": "INFO", "logger": "examples.participants",
     "message": "hotel: reserved", "saga_id": "0193...", "correlation_id": "c0ffee..."}

with ``"exception"`` holding the traceback when one was logged.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from engine.errors import InvalidInput

#: The record attributes that identify a saga, in the order they are printed.
CONTEXT_FIELDS = ("saga_id", "correlation_id")

_context: ContextVar[dict[str, str] | None] = ContextVar("saga_log_context", default=None)

# Libraries whose INFO lines are noise for a person at a terminal.
# APScheduler logs every sweep run at INFO; the sweeps say what they did themselves.
_QUIET = {"alembic": logging.WARNING, "apscheduler": logging.WARNING}


@contextmanager
def bound(saga_id: str | None = None, correlation_id: str | None = None) -> Iterator[None]:
    """Put ``saga_id`` and ``correlation_id`` on every line logged inside the block."""
    values = {**(_context.get() or {})}
    for name, value in (("saga_id", saga_id), ("correlation_id", correlation_id)):
        if value:
            values[name] = value
    token = _context.set(values)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the bound saga id and correlation id onto each record that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, values.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the keys are listed in this module's docstring."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message [saga=... correlation=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [
            f"{label}={value}"
            for label, name in (("saga", "saga_id"), ("correlation", "correlation_id"))
            if (value := getattr(record, name, None)) is not None
        ]
        if not tags:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(tags)}]{newline}{rest}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(log_format: str = "text", level: str = "INFO") -> logging.Handler:
    """Send log records to standard error as ``text`` or ``json`` lines, from ``level`` up.

    Calling it again replaces the handler it installed before; handlers others
    installed (a test runner's) are left alone.
    """
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise InvalidInput(
            "SAGA_LOG_LEVEL", f"expected one of DEBUG, INFO, WARNING, ERROR; got {level!r}"
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(max(quiet, root.level))
    return handler


def _iso(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
