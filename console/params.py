"""Parsing of query strings into engine filters; malformed input raises InvalidInput (400).

Filters live in the query string, so a link, a reload and the live refresh
all show the same list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from engine.errors import InvalidInput
from engine.model import Instance
from engine.operations import AUDIT_ACTIONS, Action, OriginKind, check_version
from engine.queries import InstanceFilter
from engine.states import SagaState

MAX_TEXT = 200
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
    saga = _text(args, "saga", 100)
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
    return ListQuery(flt, _text(args, "cursor", 300), kept)


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
    before = _text(args, "before", 20)
    if before is not None and not before.isdigit():
        raise InvalidInput("before", f"{before!r} is not a page cursor from this list")
    filters = ("actor", "action", "origin", "saga_id")
    kept = {k: args[k].strip() for k in filters if args.get(k, "").strip()}
    return AuditQuery(
        _text(args, "actor", 200),
        action,
        _text(args, "saga_id", 36),
        int(before) if before is not None else None,
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
    raw = args.get(name, "").strip()
    if not raw:
        return None
    if len(raw) > limit:
        raise InvalidInput(name, f"is {len(raw)} characters; the limit is {limit}")
    return raw


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
    a missing or malformed one checks nothing."""
    check_version(inst, int(seen) if seen is not None and seen.isdigit() else None)
