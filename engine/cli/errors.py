"""How a failed command ends: one line on standard error and an exit code.

Errors are mapped here and nowhere else; commands raise the engine's errors
(or a :class:`click.ClickException`) and :class:`engine.cli.SagaGroup` turns
them into ``saga: error: <message>`` and the code below.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from engine.display import visible
from engine.errors import (
    ConcurrencyConflict,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    SagaNotFound,
    UnknownSaga,
)
from engine.store import DatabaseError, database_message

EXIT_OK = 0
#: The store is unreachable or not migrated, or an unexpected error.
EXIT_ERROR = 1
#: A usage error or bad input (payload, option value, reason, module).
EXIT_BAD_INPUT = 2
#: No saga of that name, or no instance with that id.
EXIT_NOT_FOUND = 3
#: The state does not allow the operation, or the instance changed since ``--expected-version``.
EXIT_CONFLICT = 4


class BadInput(click.ClickException):
    """Bad input, for a command that may run outside the ``saga`` group (exit 2 either way)."""

    exit_code = EXIT_BAD_INPUT


class StoreNotReady(click.ClickException):
    """The store does not exist yet, or its schema is behind the code."""

    exit_code = EXIT_ERROR


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error a command raised."""
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    if isinstance(exc, (InvalidInput, DefinitionError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, (UnknownSaga, SagaNotFound)):
        return EXIT_NOT_FOUND
    if isinstance(exc, (InvalidTransition, ConcurrencyConflict)):
        return EXIT_CONFLICT
    return EXIT_ERROR


def error_message(exc: BaseException) -> str:
    """One line that says what was wrong."""
    if isinstance(exc, click.ClickException):
        text = exc.format_message()
    elif isinstance(exc, DatabaseError):
        text = f"the store failed: {database_message(exc)}"
    else:
        text = str(exc)
    return " ".join(text.split())


def fail(message: str, code: int) -> NoReturn:
    """Print ``saga: error: MESSAGE`` on standard error and exit with ``code``.

    A message may quote a stored value (a step's name, an id given): its
    control and bidirectional characters are shown as escapes.
    """
    click.echo(f"saga: error: {visible(message)}", err=True)
    sys.exit(code)
