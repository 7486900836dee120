"""Input at the door: query strings into engine filters; malformed input raises InvalidInput (400).

Filters live in the query string, so a link, a reload and the live refresh
all show the same list. Each value is checked with :mod:`engine.inputs`: text
the store could not take (a NUL; a lone surrogate) or longer than its field
allows, and numbers that are not ASCII digits in range, are refused with the
field named, so a database error is never the answer to bad input.

:func:`init_app` adds the backstop for every route, new ones included: a path
parameter, query parameter or form field holding text no store could keep is
refused before the view runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import Flask, request

from engine.errors import InvalidInput
from engine.inputs import (
    MAX_BIGINT,
    MAX_ID,
    MAX_INT32,
    MAX_KEY,
    MAX_NAME,
    optional_int,
    optional_text,
    problem_in_text,
)
from engine.model import Instance
from engine.operations import AUDIT_ACTIONS, MAX_ACTOR, Action, OriginKind, check_version
from engine.queries import InstanceFilter
from engine.states import SagaState

#: The search box: a saga id, correlation id or business key, the longest of which is a key.
MAX_TEXT = MAX_KEY
#: A page cursor of the instance list: epoch milliseconds, "_", a saga id.
MAX_CURSOR = 15 + 1 + MAX_ID
_TIME_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")


@dataclass(frozen=True)
class ListQuery:
    """The instance list's filters, page cursor, and the query string that repeats them."""

    filter: InstanceFilter
    cursor: str | None
    args: dict[str, str]  # the filters as given, without the cursor


@dataclass(frozen=True)
class AuditQuery:
    actor: str | None
    action: str | None
    saga_id: str | None
    before_id: int | None
    args: dict[str, str]
    #: Only the entries that came through this door (``cli``, ``console``...).
    origin: str | None = None


def parse_list(args: Mapping[str, str]) -> ListQuery:
    """The instance list's ``state``, ``saga``, ``from``, ``to`` and ``cursor`` parameters.

    ``state=stuck`` is the stuck tab: instances the stuck sweep flagged, in any state.
    """
    stuck = args.get("state", "").strip() == "stuck"
    state = None if stuck else _state(args.get("state", ""))
    saga = _text(args, "saga", MAX_NAME)
    created_from = _time(args, "from")
    created_to = _time(args, "to")
    if created_from is not None and created_to is not None and created_from >= created_to:
        raise InvalidInput("time range", "'from' must be before 'to'")
    flt = InstanceFilter(
        state=state,
        saga_name=saga,
        created_from=created_from,
        created_to=created_to,
        stuck=stuck,
    )
    kept = {k: args[k].strip() for k in ("state", "saga", "from", "to") if args.get(k, "").strip()}
    return ListQuery(flt, _text(args, "cursor", MAX_CURSOR), kept)


def parse_search(args: Mapping[str, str]) -> str | None:
    """The search box's text: a saga id, correlation id or business key."""
    return _text(args, "q", MAX_TEXT)


def parse_audit(args: Mapping[str, str]) -> AuditQuery:
    """The audit page's ``actor``, ``action``, ``origin``, ``saga_id`` filters and
    ``before`` cursor."""
    action = _text(args, "action", 40)
    if action is not None and action not in AUDIT_ACTIONS:
        raise InvalidInput("action", f"{action!r} is not one of {', '.join(AUDIT_ACTIONS)}")
    origin = _text(args, "origin", 20)
    if origin is not None and origin not in set(OriginKind):
        raise InvalidInput("origin", f"{origin!r} is not one of {', '.join(OriginKind)}")
    filters = ("actor", "action", "origin", "saga_id")
    kept = {k: args[k].strip() for k in filters if args.get(k, "").strip()}
    return AuditQuery(
        _text(args, "actor", MAX_ACTOR),
        action,
        _text(args, "saga_id", MAX_ID),
        # The id of the last entry on the previous page.
        optional_int("before", args.get("before"), low=0, high=MAX_BIGINT),
        kept,
        origin,
    )


def parse_action(name: str) -> Action:
    try:
        return Action(name)
    except ValueError:
        raise InvalidInput("action", f"{name!r} is not an operator action") from None


def _state(raw: str) -> SagaState | None:
    raw = raw.strip()
    if not raw or raw == "all":
        return None
    try:
        return SagaState(raw)
    except ValueError:
        raise InvalidInput(
            "state", f"{raw!r} is not one of {', '.join(s.value for s in SagaState)}"
        ) from None


def _text(args: Mapping[str, str], name: str, limit: int) -> str | None:
    return optional_text(name, args.get(name), limit=limit)


def _time(args: Mapping[str, str], name: str) -> int | None:
    raw = _text(args, name, 40)
    if raw is None:
        return None
    for fmt in _TIME_FORMATS:
        try:
            at = datetime.strptime(raw, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return int(at.timestamp() * 1000)
    raise InvalidInput(name, f"{raw!r} is not a time; use YYYY-MM-DDTHH:MM (UTC)")


def check_seen_version(inst: Instance, seen: str | None) -> None:
    """The version a link or form carried (``?version=``) must still be the instance's;
    a missing one checks nothing, a malformed one is refused."""
    check_version(inst, optional_int("version", seen, low=0, high=MAX_INT32))


def init_app(app: Flask) -> None:
    """Refuse, on every route, input that no store could keep (after the sign-in check)."""
    app.before_request(refuse_unstorable_input)


def refuse_unstorable_input() -> None:
    """InvalidInput (400) naming the first path parameter, query parameter or form
    field whose text the store could not keep: a NUL, or a lone surrogate.

    Each view checks its own fields' format and length too; this is the backstop
    that keeps such text from every query, whatever a view does with it.
    """
    for name, value in _given():
        problem = problem_in_text(value) if isinstance(value, str) else None
        if problem is not None:
            raise InvalidInput(name.replace("_", " "), problem)


def _given() -> Iterator[tuple[str, object]]:
    yield from (request.view_args or {}).items()
    yield from request.args.items(multi=True)
    yield from request.form.items(multi=True)
