"""Input at the door: options several commands share, and parsing of what people type.

A value that does not parse raises :class:`~engine.errors.InvalidInput`
naming the option, so the command stops (exit 2) before it touches the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from engine.errors import InvalidInput
from engine.states import SagaState

F = TypeVar("F", bound=Callable[..., Any])

#: ``--json``: print the command's document instead of text for people.
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md)."
)

#: ``--reason`` of the operator actions (an empty one is refused by the operation).
reason_option = click.option(
    "--reason", default="", help="Why; required, recorded in the audit log."
)


def actor_option(fn: F) -> F:
    """``--actor``: who acts, for the audit log; the shell's user unless given."""
    return click.option(
        "--actor",
        default=shell_user,
        show_default="$USER or 'cli'",
        help="Who is acting, for the audit log.",
    )(fn)


def page_options(fn: F) -> F:
    """``--limit`` and ``--cursor`` of the commands that list in pages."""
    fn = click.option("--cursor", help="The next_cursor a previous page printed.")(fn)
    return click.option(
        "--limit", type=int, default=50, show_default=True, help="Rows per page (1-500)."
    )(fn)


def shell_user() -> str:
    """The shell's user, who a command acts as unless told otherwise."""
    return os.environ.get("USER") or "cli"


def parse_payload(text: str, option: str = "--payload") -> Any:
    """JSON text, or the JSON in the file ``@PATH``; InvalidInput when it is neither."""
    source = option
    if text.startswith("@"):
        source = f"{option} file {text[1:]!r}"
        text = _read(text[1:], option)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            source, f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc


def _read(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(option, f"cannot read {path!r}: {exc.strerror}") from exc


def parse_state(value: str | None) -> SagaState | None:
    """A saga state, in any case; None when not given."""
    if value is None:
        return None
    try:
        return SagaState(value.strip().lower())
    except ValueError:
        raise InvalidInput(
            "--state", f"{value!r} is not a state; choose one of {', '.join(SagaState)}"
        ) from None


def parse_time(text: str | None, option: str) -> int | None:
    """An ISO time, UTC unless it says otherwise, as milliseconds since the epoch."""
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(option, f"{text!r} is not a time; use YYYY-MM-DDTHH:MM (UTC)") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)
