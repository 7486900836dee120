"""Read models for the CLI and the console: lists, timelines, dead letters, audit.

Lists use keyset pagination (newest first, by ``(created_at, id)``), never
OFFSET, so page 1,000 costs what page 1 costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from engine.errors import InvalidInput
from engine.model import EventKind
from engine.signals import OpenWait
from engine.states import SagaState, StepStatus
from engine.store import Store
from engine.store import schema as t

MAX_PAGE = 500


@dataclass(frozen=True)
class InstanceFilter:
    """Which instances to list; every field is optional."""

    state: SagaState | None = None
    saga_name: str | None = None
    created_from: int | None = None  # epoch ms, inclusive
    created_to: int | None = None  # epoch ms, exclusive
    search: str | None = None  # a saga id, correlation id or business key
    stuck: bool = False  # only instances the stuck sweep flagged (stuck_since set)


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

    def to_json(self) -> dict[str, Any]:
        # The `saga list --json` shape is pinned (docs/cli.md); stuck_since and kind are
        # for the console.
        doc = asdict(self)
        del doc["stuck_since"]
        del doc["kind"]
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Queries:
    """Read-only questions about the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list_instances(
        self, flt: InstanceFilter = InstanceFilter(), *, limit: int = 50, cursor: str | None = None
    ) -> Page:
        """Newest first; pass ``page.next_cursor`` back as ``cursor`` for the next page."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}, got {limit}")
        i, s = t.instances.c, t.steps.c
        query = (
            sa.select(t.instances, s.name.label("current_step_name"))
            .outerjoin(t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step))
            .where(*_conditions(flt))
            .order_by(i.created_at.desc(), i.id.desc())
            .limit(limit + 1)
        )
        if cursor:
            at, last_id = _decode_cursor(cursor)
            query = query.where(sa.tuple_(i.created_at, i.id) < sa.tuple_(at, last_id))
        with self.store.db.connect() as c:
            rows = c.execute(query).mappings().all()
        items = [_summary(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_cursor(items[-1]) if more and items else None)

    def counts_by_state(self, saga_name: str | None = None) -> dict[str, int]:
        """How many instances are in each state (every state present, zeros included)."""
        i = t.instances.c
        query = sa.select(i.state, sa.func.count()).group_by(i.state)
        if saga_name:
            query = query.where(i.saga_name == saga_name)
        with self.store.db.connect() as c:
            found: dict[str, int] = {str(k): int(v) for k, v in c.execute(query)}
        return {str(st): int(found.get(str(st), 0)) for st in SagaState}

    def counts_by_state_capped(self, cap: int, saga_name: str | None = None) -> dict[str, int]:
        """As :meth:`counts_by_state`, but a state with more than ``cap`` counts as ``cap + 1``.

        Each count stops after ``cap + 1`` rows of the ``(state, created_at)``
        index, so it costs the same on a store of a million instances as on a
        small one (the console shows "10,000+"); an exact count reads them all.
        """
        i = t.instances.c
        parts = []
        for st in SagaState:
            rows = sa.select(sa.literal(1).label("one")).where(i.state == str(st))
            if saga_name:
                rows = rows.where(i.saga_name == saga_name)
            limited = rows.limit(cap + 1).subquery()
            parts.append(sa.select(sa.literal(str(st)), sa.func.count()).select_from(limited))
        with self.store.db.connect() as c:
            found = {str(k): int(v) for k, v in c.execute(sa.union_all(*parts))}
        return {str(st): found.get(str(st), 0) for st in SagaState}

    def count_stuck(self, cap: int, saga_name: str | None = None) -> int:
        """Instances the stuck sweep flagged, counting at most ``cap + 1`` (its partial index)."""
        i = t.instances.c
        rows = sa.select(sa.literal(1).label("one")).where(i.stuck_since.is_not(None))
        if saga_name:
            rows = rows.where(i.saga_name == saga_name)
        query = sa.select(sa.func.count()).select_from(rows.limit(cap + 1).subquery())
        with self.store.db.connect() as c:
            return int(c.execute(query).scalar_one())

    def stuck_since(self, saga_id: str) -> int | None:
        """When the stuck sweep flagged this instance; None when it is not flagged."""
        i = t.instances.c
        with self.store.db.connect() as c:
            found = c.execute(sa.select(i.stuck_since).where(i.id == saga_id)).scalar()
        return None if found is None else int(found)

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
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}, got {limit}")
        d, i = t.dead_letters.c, t.instances.c
        query = (
            sa.select(
                d.id,
                d.saga_id,
                d.saga_name,
                i.saga_version,
                i.business_key,
                i.correlation_id,
                i.version,
                d.step_index,
                d.step_name,
                d.phase,
                d.error,
                d.attempts,
                d.created_at,
            )
            .join(t.instances, i.id == d.saga_id)
            .where(d.resolved_at.is_(None), i.state == str(SagaState.FAILED))
            .order_by(d.created_at.desc(), d.id.desc())
            .limit(limit + 1)
        )
        if saga_name:
            query = query.where(d.saga_name == saga_name)
        if step_name:
            query = query.where(d.step_name == step_name)
        if before:
            at, last_id = _decode_dead_letter_cursor(before)
            query = query.where(sa.tuple_(d.created_at, d.id) < sa.tuple_(at, last_id))
        with self.store.db.connect() as c:
            rows = c.execute(query).mappings().all()
            spans = _failure_spans(c, [r["saga_id"] for r in rows[:limit]])
        items = [_dead_letter_item(r, spans) for r in rows[:limit]]
        more = len(rows) > limit and items
        cursor = f"{items[-1].dead_lettered_at}_{items[-1].dead_letter_id}" if more else None
        return DeadLetterPage(items, cursor)

    def recent_step_durations(self, saga_name: str, limit: int = 200) -> dict[str, list[int]]:
        """How long each step's last attempt took (ms), over the newest ``limit`` instances
        of ``saga_name`` where it succeeded; for the step-duration charts.

        The newest instances are picked per state through the ``(saga_name,
        state, created_at)`` index, so the cost does not grow with the store.
        """
        i, s = t.instances.c, t.steps.c
        newest = [
            sa.select(i.id, i.created_at)
            .where(i.saga_name == saga_name, i.state == str(st))
            .order_by(i.created_at.desc())
            .limit(limit)
            .subquery()
            for st in SagaState
        ]
        picked = sa.union_all(*[sa.select(n.c.id, n.c.created_at) for n in newest]).subquery()
        ids = sa.select(picked.c.id).order_by(picked.c.created_at.desc()).limit(limit)
        query = sa.select(s.name, s.finished_at - s.started_at).where(
            s.saga_id.in_(ids),
            s.status == str(StepStatus.SUCCEEDED),
            s.started_at.is_not(None),
            s.finished_at.is_not(None),
        )
        found: dict[str, list[int]] = {}
        with self.store.db.connect() as c:
            for name, took in c.execute(query):
                found.setdefault(str(name), []).append(max(int(took), 0))
        return found

    def saga_names(self) -> list[str]:
        with self.store.db.connect() as c:
            return list(
                c.execute(
                    sa.select(t.instances.c.saga_name).distinct().order_by(t.instances.c.saga_name)
                ).scalars()
            )

    def timeline(self, saga_id: str) -> list[EventRecord]:
        """Every event of one instance, oldest first."""
        e = t.events.c
        with self.store.db.connect() as c:
            rows = c.execute(sa.select(t.events).where(e.saga_id == saga_id).order_by(e.id))
            return [EventRecord(**r) for r in rows.mappings()]

    def dead_letters(
        self, *, saga_id: str | None = None, open_only: bool = True, limit: int = 200
    ) -> list[DeadLetterRecord]:
        """Dead-letter records, newest first."""
        d = t.dead_letters.c
        query = sa.select(t.dead_letters).order_by(d.id.desc()).limit(limit)
        if saga_id:
            query = query.where(d.saga_id == saga_id)
        if open_only:
            query = query.where(d.resolved_at.is_(None))
        with self.store.db.connect() as c:
            return [DeadLetterRecord(**r) for r in c.execute(query).mappings()]

    def operator_actions(
        self,
        *,
        saga_id: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 200,
        before_id: int | None = None,
    ) -> list[OperatorActionRecord]:
        """The audit log, newest first."""
        a = t.operator_actions.c
        query = sa.select(t.operator_actions).order_by(a.id.desc()).limit(limit)
        for column, value in ((a.saga_id, saga_id), (a.actor, actor), (a.action, action)):
            if value:
                query = query.where(column == value)
        if before_id is not None:
            query = query.where(a.id < before_id)
        with self.store.db.connect() as c:
            return [OperatorActionRecord(**r) for r in c.execute(query).mappings()]

    def duplicates_absorbed(self, keys: list[str]) -> dict[str, int]:
        """Duplicate deliveries the idempotency guard absorbed, per key (guard in this store)."""
        k = t.idempotency_keys.c
        with self.store.db.connect() as c:
            rows = c.execute(sa.select(k.key, k.duplicates).where(k.key.in_(keys)))
            return {key: int(n) for key, n in rows}

    def event_dead_letters(self, limit: int = 200) -> list[dict[str, Any]]:
        """Domain events a choreography's handler gave up on, or could not read; newest first."""
        return self.store.event_dead_letters(limit)


def _conditions(flt: InstanceFilter) -> list[Any]:
    i = t.instances.c
    conds: list[Any] = []
    if flt.state is not None:
        conds.append(i.state == str(flt.state))
    if flt.saga_name:
        conds.append(i.saga_name == flt.saga_name)
    if flt.created_from is not None:
        conds.append(i.created_at >= flt.created_from)
    if flt.created_to is not None:
        conds.append(i.created_at < flt.created_to)
    if flt.search:
        text = flt.search.strip()
        conds.append(sa.or_(i.id == text, i.correlation_id == text, i.business_key == text))
    if flt.stuck:
        conds.append(i.stuck_since.is_not(None))
    return conds


def _summary(row: Any) -> InstanceSummary:
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
    )


_FAILURE_KINDS = [
    str(k)
    for k in (EventKind.ATTEMPT_FAILED, EventKind.ATTEMPT_TIMED_OUT, EventKind.ATTEMPT_ABANDONED)
]


def _failure_spans(c: sa.Connection, saga_ids: list[str]) -> dict[tuple[str, int, str], Any]:
    """First and last failed attempt per (saga, step, phase), from the timeline."""
    if not saga_ids:
        return {}
    e = t.events.c
    query = (
        sa.select(e.saga_id, e.step_index, e.phase, sa.func.min(e.at), sa.func.max(e.at))
        .where(e.saga_id.in_(saga_ids), e.kind.in_(_FAILURE_KINDS))
        .group_by(e.saga_id, e.step_index, e.phase)
    )
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in c.execute(query)}


def _dead_letter_item(row: Any, spans: dict[tuple[str, int, str], Any]) -> DeadLetterItem:
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
    at, sep, last_id = cursor.partition("_")
    if not sep or not at.isdigit() or not last_id.isdigit():
        raise InvalidInput("cursor", f"{cursor!r} is not a page cursor from this list")
    return int(at), int(last_id)


def _encode_cursor(item: InstanceSummary) -> str:
    return f"{item.created_at}_{item.id}"


def _decode_cursor(cursor: str) -> tuple[int, str]:
    at, sep, last_id = cursor.partition("_")
    if not sep or not at.isdigit() or not last_id:
        raise InvalidInput("cursor", f"{cursor!r} is not a page cursor from this list")
    return int(at), last_id


# The door's names, with the records of reads answered elsewhere (OpenWait, from
# engine.signals) that callers name: the console and the CLI import them from here.
__all__ = [
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
