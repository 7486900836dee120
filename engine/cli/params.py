"""Input at the door: options several commands share, and parsing of what people type.

A value that does not parse raises :class:`~engine.errors.InvalidInput`
naming the option, or click's usage error, so the command stops (exit 2)
before it touches the store. Numbers are :class:`WholeNumber` (ASCII digits in
a range, :func:`engine.inputs.parse_int`), never click's ``int``, which takes
``٣`` and ``1_000``; ids are :class:`Identifier`.
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
from engine.inputs import MAX_BIGINT, MAX_INT32, check_filter, check_id, parse_int
from engine.operations import MAX_ACTOR
from engine.queries import MAX_PAGE
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
        type=Text(MAX_ACTOR),
        default=shell_user,
        show_default="$USER or 'cli'",
        help="Who is acting, for the audit log.",
    )(fn)


class WholeNumber(click.IntRange):
    """A whole number in ASCII digits from ``low`` to ``high``, as :func:`engine.inputs.parse_int`
    reads it (InvalidInput naming the option otherwise); the help shows the range as
    click's ``IntRange`` does."""

    def __init__(self, low: int = 0, high: int = MAX_BIGINT) -> None:
        super().__init__(low, high)
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return super().convert(value, param, ctx)  # a default: only the range to check
        return parse_int(field_name(param), str(value), low=self.low, high=self.high)


class Identifier(click.ParamType[str, Any]):
    """An id the engine gave out (a saga id, a bulk operation's id): text the store can
    match, at most :data:`engine.inputs.MAX_ID` characters (:func:`engine.inputs.check_id`)."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return check_id(field_name(param), str(value))


class Text(click.ParamType[str, Any]):
    """Text the store can keep (no NUL, no lone surrogate: a shell hands bytes that are
    not UTF-8 on as those), at most ``limit`` characters, as given."""

    name = "text"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return check_filter(field_name(param), str(value), limit=self.limit)


#: The type of every ``SAGA_ID`` and ``OPERATION_ID`` argument.
ID = Identifier()


def field_name(param: click.Parameter | None) -> str:
    """How an error names ``param``: ``--limit`` for an option, ``saga id`` for an argument."""
    if isinstance(param, click.Option) and param.opts:
        return max(param.opts, key=len)
    if param is not None and param.name:
        return param.name.replace("_", " ")
    return "value"


def page_options(fn: F) -> F:
    """``--limit`` and ``--cursor`` of the commands that list in pages."""
    fn = click.option("--cursor", help="The next_cursor a previous page printed.")(fn)
    return click.option(
        "--limit",
        type=WholeNumber(1, MAX_PAGE),
        default=50,
        show_default=True,
        help="Rows per page.",
    )(fn)


#: ``--expected-version N`` of the operator actions.
expected_version_option = click.option(
    "--expected-version",
    type=WholeNumber(0, MAX_INT32),
    metavar="N",
    help="Refuse if the instance's version is no longer N (from `saga show`).",
)


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
    except ValueError as exc:  # a number past int()'s 4,300 digits
        raise InvalidInput(source, "a number in it has too many digits") from exc
    except RecursionError:
        raise InvalidInput(source, "it is nested too deeply") from None


def _read(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(option, f"cannot read {path!r}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL in the path; or the file is not UTF-8
        raise InvalidInput(option, f"cannot read {path!r}: {exc}") from exc


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
