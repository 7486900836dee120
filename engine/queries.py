"""The read door: what the CLI and the console ask of the store, as records.

Every question's SQL is the store's (:mod:`engine.store.reads`); this module
checks what callers pass (with :mod:`engine.inputs`: a filter the store could
not take, such as one with a NUL, is :class:`~engine.errors.InvalidInput`, never
a database error), turns rows into records, and pages with cursors.
Lists use keyset pagination (newest first, by ``(created_at, id)``), never
OFFSET, so page 1,000 costs what page 1 costs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import InvalidInput
from engine.inputs import MAX_BIGINT, MAX_KEY, MAX_NAME, check_filter, check_id
from engine.model import now_ms
from engine.outcomes import Followed, Result, follow
from engine.signals import OpenWait
from engine.states import SagaState, side_in_play
from engine.store import Store
from engine.store.reads import InstanceFilter, Row

# The door's names, with the records of reads answered elsewhere (OpenWait, from
# engine.signals) that callers name: the console and the CLI import them from here.
__all__ = [
    "EVERY_INSTANCE",
    "MAX_PAGE",
    "DeadLetterItem",
    "DeadLetterPage",
    "DeadLetterRecord",
    "EventRecord",
    "InstanceFilter",
    "InstanceSummary",
    "OpenWait",
    "OperatorActionRecord",
    "Page",
    "Queries",
]

MAX_PAGE = 500
# Page cursors, parsed strictly: epoch milliseconds (up to 15 ASCII digits, so any
# value fits a bigint column), then the last row's id as this store writes them.
_INSTANCE_CURSOR = re.compile(
    r"(?P<at>[0-9]{1,15})_(?P<id>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})"
)
_DEAD_LETTER_CURSOR = re.compile(r"(?P<at>[0-9]{1,15})_(?P<id>[0-9]{1,18})")
# The audit log's action names (engine.interventions.AUDIT_ACTIONS) are shorter.
_MAX_ACTION = 40
#: The filter that lists every instance.
EVERY_INSTANCE = InstanceFilter()


@dataclass(frozen=True)
class InstanceSummary:
    """One row of the instance list."""

    id: str
    saga_name: str
    saga_version: int
    state: str
    current_step: int
    current_step_name: str | None
    step_count: int
    business_key: str | None
    correlation_id: str
    version: int
    created_at: int
    updated_at: int
    last_progress_at: int
    next_run_at: int | None
    lease_owner: str | None
    stuck_since: int | None = None  # when the stuck sweep flagged it; None when not stuck
    kind: str = "orchestrated"  # or "choreographed" (engine.choreography)
    #: "action" or "compensate": the side of the current step in play, or last in play
    #: (a failed row says which side failed; a compensated one, the compensation).
    phase: str = "action"

    def to_json(self) -> dict[str, Any]:
        # The `saga list --json` shape is pinned (docs/cli.md); stuck_since, kind and
        # phase are for the console.
        doc = asdict(self)
        del doc["stuck_since"]
        del doc["kind"]
        del doc["phase"]
        return doc


@dataclass(frozen=True)
class Page:
    """A page of instances and the cursor of the next page (None on the last)."""

    items: list[InstanceSummary]
    next_cursor: str | None


@dataclass(frozen=True)
class EventRecord:
    """One stored timeline event."""

    id: int
    saga_id: str
    correlation_id: str
    at: int
    kind: str
    step_index: int | None
    step_name: str | None
    phase: str | None
    attempt: int | None
    actor: str
    error: str | None
    traceback: str | None
    detail: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeadLetterRecord:
    """Why an instance was dead-lettered, and who resolved it."""

    id: int
    saga_id: str
    saga_name: str
    step_index: int
    step_name: str
    phase: str
    error: str
    traceback: str | None
    attempts: int
    created_at: int
    resolved_at: int | None
    resolved_by: str | None
    resolution: str | None
    #: The sweeper's automatic retry: retries made before this dead letter (None: not
    #: planned yet), and when it retries it (None: never, no policy or the limit reached).
    auto_retries: int | None = None
    auto_retry_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeadLetterItem:
    """A dead-lettered instance, as the dead-letter page and ``saga deadletters`` list it."""

    dead_letter_id: int
    saga_id: str
    saga_name: str
    saga_version: int
    business_key: str | None
    correlation_id: str
    version: int
    step_index: int
    step_name: str
    phase: str
    error: str
    attempts: int
    first_failure_at: int  # the first failed attempt of this step and side
    last_failure_at: int  # the last one
    dead_lettered_at: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeadLetterPage:
    """A page of the dead-letter queue and the cursor of the next (None on the last)."""

    items: list[DeadLetterItem]
    next_cursor: str | None


@dataclass(frozen=True)
class OperatorActionRecord:
    """One audit-log entry."""

    id: int
    at: int
    actor: str
    action: str
    saga_id: str
    reason: str
    state_before: str
    state_after: str
    version_before: int
    version_after: int
    step_name: str | None
    detail: dict[str, Any] | None
    #: The door it came through (``cli``, ``console``, ``api``, ``sweeper``, ``engine``,
    #: or ``unknown`` before schema 0011), beside the ``actor`` it claims.
    origin: str
    #: Who or what behind the origin: ``user@host`` for the CLI, the signed-in user...
    origin_detail: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ActionResult:
    """One operator action that changed an instance, and what became of the instance
    after it (:mod:`engine.outcomes`), e.g. "retry by alice at 10:02 -> completed at 10:03"."""

    action: OperatorActionRecord
    followed: Followed

    @property
    def result(self) -> Result:
        return self.followed.result

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.to_json(),
            "result": str(self.followed.result),
            "ended_at": self.followed.ended_at,
            "final": self.followed.is_final,
            "superseded_by": self.followed.by,
        }


class Queries:
    """Read-only questions about the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._reads = store.reads

    def list_instances(
        self, flt: InstanceFilter = EVERY_INSTANCE, *, limit: int = 50, cursor: str | None = None
    ) -> Page:
        """Newest first; pass ``page.next_cursor`` back as ``cursor`` for the next page."""
        _check_limit(limit)
        _check_instance_filter(flt)
        after = _decode_cursor(cursor) if cursor else None
        rows, more = self._reads.instances(flt, after, limit)
        items = [_summary(r) for r in rows]
        return Page(items, _encode_cursor(items[-1]) if more and items else None)

    def counts_by_state(self, saga_name: str | None = None) -> dict[str, int]:
        """How many instances are in each state (every state present, zeros included)."""
        found = self._reads.counts_by_state(_saga_name(saga_name))
        return {str(st): int(found.get(str(st), 0)) for st in SagaState}

    def counts_by_state_capped(self, cap: int, saga_name: str | None = None) -> dict[str, int]:
        """As :meth:`counts_by_state`, but a state with more than ``cap`` counts as ``cap + 1``.

        Each count stops after ``cap + 1`` rows of the ``(state, created_at)``
        index, so it costs the same on a store of a million instances as on a
        small one (the console shows "10,000+"); an exact count reads them all.
        """
        found = self._reads.counts_by_state_capped(cap, _saga_name(saga_name))
        return {str(st): found.get(str(st), 0) for st in SagaState}

    def count_stuck(self, cap: int, saga_name: str | None = None) -> int:
        """Instances the stuck sweep flagged, counting at most ``cap + 1`` (its partial index)."""
        return self._reads.count_stuck(cap, _saga_name(saga_name))

    def stuck_since(self, saga_id: str) -> int | None:
        """When the stuck sweep flagged this instance; None when it is not flagged."""
        return self._reads.stuck_since(check_id("saga id", saga_id))

    def dead_lettered(
        self,
        *,
        saga_name: str | None = None,
        step_name: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> DeadLetterPage:
        """Instances waiting in the dead-letter queue, newest first, one row each.

        Each row has the failing step and side, its error and attempts, and
        the first and last failed attempt of that step and side (from the
        timeline). ``before`` is the ``next_cursor`` of the previous page.
        """
        _check_limit(limit)
        saga_name = _saga_name(saga_name)
        step_name = check_filter("step name", step_name, limit=MAX_NAME)
        after = _decode_dead_letter_cursor(before) if before else None
        found = self._reads.dead_lettered(saga_name, step_name, after, limit)
        items = [_dead_letter_item(r, found.spans) for r in found.rows]
        more = found.more and items
        cursor = f"{items[-1].dead_lettered_at}_{items[-1].dead_letter_id}" if more else None
        return DeadLetterPage(items, cursor)

    def recent_step_durations(self, saga_name: str, limit: int = 200) -> dict[str, list[int]]:
        """How long each step's last attempt took (ms), over the newest ``limit`` instances
        of ``saga_name`` where it succeeded; for the step-duration charts.

        The newest instances are picked per state through the ``(saga_name,
        state, created_at)`` index, so the cost does not grow with the store.
        """
        found: dict[str, list[int]] = {}
        _saga_name(saga_name)
        for name, took in self._reads.recent_step_durations(saga_name, limit):
            found.setdefault(name, []).append(max(took, 0))
        return found

    def saga_names(self) -> list[str]:
        return self._reads.saga_names()

    def timeline(self, saga_id: str) -> list[EventRecord]:
        """Every event of one instance, oldest first."""
        return [EventRecord(**r) for r in self._reads.timeline(check_id("saga id", saga_id))]

    def dead_letters(
        self, *, saga_id: str | None = None, open_only: bool = True, limit: int = 200
    ) -> list[DeadLetterRecord]:
        """Dead-letter records, newest first."""
        if saga_id is not None:
            check_id("saga id", saga_id)
        rows = self._reads.dead_letters(saga_id, open_only, limit)
        return [DeadLetterRecord(**r) for r in rows]

    def operator_actions(
        self,
        *,
        saga_id: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 200,
        before_id: int | None = None,
        origin: str | None = None,
    ) -> list[OperatorActionRecord]:
        """The audit log, newest first; ``before_id`` is the id of the last entry seen,
        ``origin``: only the entries of that kind."""
        if saga_id is not None:
            check_id("saga id", saga_id)
        check_filter("actor", actor, limit=MAX_KEY)
        check_filter("action", action, limit=_MAX_ACTION)
        check_filter("origin", origin, limit=_MAX_ACTION)
        if before_id is not None and not 0 <= before_id <= MAX_BIGINT:
            raise InvalidInput("before", f"must be between 0 and {MAX_BIGINT:,}")
        rows = self._reads.operator_actions(saga_id, actor, action, before_id, limit, origin)
        return [OperatorActionRecord(**r) for r in rows]

    def action_results(self, saga_id: str, limit: int = 50) -> list[ActionResult]:
        """What became of each operator action that changed the instance, newest first:
        followed from the store in three queries, whatever the number of actions."""
        taken = [
            a
            for a in self.operator_actions(saga_id=saga_id, limit=limit)
            if a.version_after > a.version_before  # notes changed nothing: nothing to follow
        ]
        if not taken:
            return []
        trace = self._reads.traces([saga_id], min(a.at for a in taken))[saga_id]
        now = now_ms()
        return [ActionResult(a, follow(a.at, a.version_after, trace, now)) for a in taken]

    def duplicates_absorbed(self, keys: list[str]) -> dict[str, int]:
        """Duplicate deliveries the idempotency guard absorbed, per key (guard in this store)."""
        return self._reads.duplicates_absorbed(keys)

    def event_dead_letters(self, limit: int = 200) -> list[dict[str, Any]]:
        """Domain events a choreography's handler gave up on, or could not read; newest first."""
        return self.store.event_dead_letters(limit)


def _check_instance_filter(flt: InstanceFilter) -> None:
    _saga_name(flt.saga_name)
    check_filter("search", flt.search, limit=MAX_KEY)


def _saga_name(name: str | None) -> str | None:
    return check_filter("saga name", name, limit=MAX_NAME)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}, got {limit}")


def _summary(row: Row) -> InstanceSummary:
    return InstanceSummary(
        id=row["id"],
        saga_name=row["saga_name"],
        saga_version=row["saga_version"],
        state=row["state"],
        current_step=row["current_step"],
        current_step_name=row["current_step_name"],
        step_count=row["step_count"],
        business_key=row["business_key"],
        correlation_id=row["correlation_id"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_progress_at=row["last_progress_at"],
        next_run_at=row["next_run_at"],
        lease_owner=row["lease_owner"],
        stuck_since=row["stuck_since"],
        kind=row["kind"],
        phase=str(side_in_play(row["state"], row["current_comp_status"] or "not_needed")),
    )


def _dead_letter_item(
    row: Row, spans: dict[tuple[str, int, str], tuple[int, int]]
) -> DeadLetterItem:
    first, last = spans.get((row["saga_id"], row["step_index"], row["phase"]), (None, None))
    return DeadLetterItem(
        dead_letter_id=row["id"],
        saga_id=row["saga_id"],
        saga_name=row["saga_name"],
        saga_version=row["saga_version"],
        business_key=row["business_key"],
        correlation_id=row["correlation_id"],
        version=row["version"],
        step_index=row["step_index"],
        step_name=row["step_name"],
        phase=row["phase"],
        error=row["error"],
        attempts=row["attempts"],
        first_failure_at=first if first is not None else row["created_at"],
        last_failure_at=last if last is not None else row["created_at"],
        dead_lettered_at=row["created_at"],
    )


def _decode_dead_letter_cursor(cursor: str) -> tuple[int, int]:
    match = _DEAD_LETTER_CURSOR.fullmatch(cursor)
    if match is None:
        raise _not_a_cursor(cursor)
    return int(match["at"]), int(match["id"])


def _encode_cursor(item: InstanceSummary) -> str:
    return f"{item.created_at}_{item.id}"


def _decode_cursor(cursor: str) -> tuple[int, str]:
    match = _INSTANCE_CURSOR.fullmatch(cursor)
    if match is None:
        raise _not_a_cursor(cursor)
    return int(match["at"]), match["id"]


def _not_a_cursor(cursor: str) -> InvalidInput:
    shown = cursor if len(cursor) <= 80 else cursor[:80] + "…"
    return InvalidInput("cursor", f"{shown!r} is not a page cursor from this list")
