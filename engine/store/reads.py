"""The read side's SQL: what the console, the CLI and the metrics ask of the store.

:class:`Reads` answers with rows (mappings by column name); the read door,
:class:`engine.queries.Queries`, turns them into its records and cursors.
Lists page by keyset (newest first, by ``(created_at, id)``), never OFFSET,
so page 1,000 costs what page 1 costs; counts stop early or read partial
indexes, so they cost the same on a large store as on a small one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, RowMapping
from sqlalchemy.engine import Engine

from engine.inputs import check_millis
from engine.model import EventKind
from engine.outcomes import LaterAction, Trace
from engine.states import SagaState, StepStatus
from engine.store import schema as t

#: A row, by column name.
Row = RowMapping

_OPEN_SQL = sa.text(f"saga_instances.{t.OPEN}")
_FAILURE_KINDS = [
    str(k)
    for k in (EventKind.ATTEMPT_FAILED, EventKind.ATTEMPT_TIMED_OUT, EventKind.ATTEMPT_ABANDONED)
]


@dataclass(frozen=True)
class InstanceFilter:
    """Which instances to list; every field is optional."""

    state: SagaState | None = None
    saga_name: str | None = None
    created_from: int | None = None  # epoch ms, inclusive
    created_to: int | None = None  # epoch ms, exclusive
    search: str | None = None  # a saga id, correlation id or business key
    stuck: bool = False  # only instances the stuck sweep flagged (stuck_since set)

    def __post_init__(self) -> None:
        # Compared with bigint columns: a bound past them is bad input, not a store error.
        check_millis("from", self.created_from)
        check_millis("to", self.created_to)


@dataclass(frozen=True)
class LiveCounts:
    """What the metrics' store gauges show, read in one go."""

    #: (saga, state) -> instances, for running, compensating and failed.
    instances: dict[tuple[str, str], int] = field(default_factory=dict)
    #: saga -> instances the stuck sweep flagged.
    stuck: dict[str, int] = field(default_factory=dict)
    #: saga -> (open dead letters, creation time of the oldest, epoch ms).
    dead_letters: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class DeadLetterRows:
    """A page of the dead-letter queue; the span of failed attempts of each row's step
    and side: (saga id, step index, phase) -> (first, last) failure time; and whether
    more rows follow."""

    rows: Sequence[Row]
    spans: dict[tuple[str, int, str], tuple[int, int]]
    more: bool


class Reads:
    """Read-only SQL over the saga tables."""

    def __init__(self, db: Engine) -> None:
        self.db = db

    def instances(
        self, flt: InstanceFilter, after: tuple[int, str] | None, limit: int
    ) -> tuple[list[Row], bool]:
        """Up to ``limit`` instances ``flt`` matches, newest first, older than ``after``
        (created_at, id), each with its current step's name; and whether more follow."""
        i, s = t.instances.c, t.steps.c
        query = (
            sa.select(
                t.instances,
                s.name.label("current_step_name"),
                s.comp_status.label("current_comp_status"),
            )
            .outerjoin(t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step))
            .where(*_conditions(flt))
            .order_by(i.created_at.desc(), i.id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            query = query.where(sa.tuple_(i.created_at, i.id) < sa.tuple_(*after))
        rows = self._rows(query)
        return rows[:limit], len(rows) > limit

    def counts_by_state(self, saga_name: str | None) -> dict[str, int]:
        """Instances per state, for the states that have any."""
        i = t.instances.c
        query = sa.select(i.state, sa.func.count()).group_by(i.state)
        if saga_name:
            query = query.where(i.saga_name == saga_name)
        with self.db.connect() as c:
            return {str(k): int(v) for k, v in c.execute(query)}

    def counts_by_state_capped(self, cap: int, saga_name: str | None) -> dict[str, int]:
        """Instances per state, each count stopping after ``cap + 1`` rows of the
        ``(state, created_at)`` index."""
        i = t.instances.c
        parts = []
        for st in SagaState:
            rows = sa.select(sa.literal(1).label("one")).where(i.state == str(st))
            if saga_name:
                rows = rows.where(i.saga_name == saga_name)
            limited = rows.limit(cap + 1).subquery()
            parts.append(sa.select(sa.literal(str(st)), sa.func.count()).select_from(limited))
        with self.db.connect() as c:
            return {str(k): int(v) for k, v in c.execute(sa.union_all(*parts))}

    def count_stuck(self, cap: int, saga_name: str | None) -> int:
        """Flagged instances, counting at most ``cap + 1`` (along their partial index)."""
        i = t.instances.c
        rows = sa.select(sa.literal(1).label("one")).where(i.stuck_since.is_not(None))
        if saga_name:
            rows = rows.where(i.saga_name == saga_name)
        query = sa.select(sa.func.count()).select_from(rows.limit(cap + 1).subquery())
        with self.db.connect() as c:
            return int(c.execute(query).scalar_one())

    def stuck_since(self, saga_id: str) -> int | None:
        """When the stuck sweep flagged this instance; None when it is not flagged."""
        i = t.instances.c
        with self.db.connect() as c:
            found = c.execute(sa.select(i.stuck_since).where(i.id == saga_id)).scalar()
        return None if found is None else int(found)

    def dead_lettered(
        self,
        saga_name: str | None,
        step_name: str | None,
        before: tuple[int, int] | None,
        limit: int,
    ) -> DeadLetterRows:
        """Up to ``limit`` open dead letters of failed instances, newest first, older than
        ``before`` (created_at, id), with the first and last failure of each; and whether
        more follow."""
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
        if before is not None:
            query = query.where(sa.tuple_(d.created_at, d.id) < sa.tuple_(*before))
        with self.db.connect() as c:
            rows = c.execute(query).mappings().all()
            page = rows[:limit]
            spans = _failure_spans(c, [r["saga_id"] for r in page])
        return DeadLetterRows(page, spans, more=len(rows) > limit)

    def recent_step_durations(self, saga_name: str, limit: int) -> list[tuple[str, int]]:
        """(step, ms) of each succeeded step's last attempt over the newest ``limit``
        instances of ``saga_name``, picked per state through the ``(saga_name, state,
        created_at)`` index so the cost does not grow with the store."""
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
        with self.db.connect() as c:
            return [(str(name), int(took)) for name, took in c.execute(query)]

    def saga_names(self) -> list[str]:
        """The saga types the store has instances of, in order."""
        i = t.instances.c
        with self.db.connect() as c:
            return list(
                c.execute(sa.select(i.saga_name).distinct().order_by(i.saga_name)).scalars()
            )

    def timeline(self, saga_id: str) -> list[Row]:
        """Every event of one instance, oldest first."""
        e = t.events.c
        return self._rows(sa.select(t.events).where(e.saga_id == saga_id).order_by(e.id))

    def dead_letters(self, saga_id: str | None, open_only: bool, limit: int) -> list[Row]:
        """Dead-letter records, newest first."""
        d = t.dead_letters.c
        query = sa.select(t.dead_letters).order_by(d.id.desc()).limit(limit)
        if saga_id:
            query = query.where(d.saga_id == saga_id)
        if open_only:
            query = query.where(d.resolved_at.is_(None))
        return self._rows(query)

    def operator_actions(
        self,
        saga_id: str | None,
        actor: str | None,
        action: str | None,
        before_id: int | None,
        limit: int,
        origin: str | None = None,
    ) -> list[Row]:
        """The audit log, newest first; each of the filters given must match."""
        a = t.operator_actions.c
        query = sa.select(t.operator_actions).order_by(a.id.desc()).limit(limit)
        filters = ((a.saga_id, saga_id), (a.actor, actor), (a.action, action), (a.origin, origin))
        for column, value in filters:
            if value:
                query = query.where(column == value)
        if before_id is not None:
            query = query.where(a.id < before_id)
        return self._rows(query)

    def traces(self, saga_ids: Sequence[str], since: int) -> dict[str, Trace]:
        """What became of each instance since ``since`` (epoch ms), in three queries:
        its state now, the dead letters recorded and the state-changing operator actions
        taken since, oldest first; an instance that no longer exists has state None."""
        i, d, a = t.instances.c, t.dead_letters.c, t.operator_actions.c
        ids = list(saga_ids)
        with self.db.connect() as c:
            now = {
                r.id: r
                for r in c.execute(sa.select(i.id, i.state, i.updated_at).where(i.id.in_(ids)))
            }
            dead: dict[str, list[int]] = {}
            for saga_id, at in c.execute(
                sa.select(d.saga_id, d.created_at)
                .where(d.saga_id.in_(ids), d.created_at >= since)
                .order_by(d.created_at, d.id)
            ):
                dead.setdefault(saga_id, []).append(int(at))
            acts: dict[str, list[LaterAction]] = {}
            for r in c.execute(
                sa.select(a.saga_id, a.at, a.actor, a.action, a.version_before)
                .where(a.saga_id.in_(ids), a.at >= since, a.version_after > a.version_before)
                .order_by(a.id)
            ):
                acts.setdefault(r.saga_id, []).append(
                    LaterAction(int(r.at), r.actor, r.action, int(r.version_before))
                )
        return {
            saga_id: Trace(
                state=now[saga_id].state if saga_id in now else None,
                updated_at=int(now[saga_id].updated_at) if saga_id in now else None,
                dead_letters=tuple(dead.get(saga_id, ())),
                actions=tuple(acts.get(saga_id, ())),
            )
            for saga_id in ids
        }

    def duplicates_absorbed(self, keys: list[str]) -> dict[str, int]:
        """Per idempotency key kept in this database, the duplicates the guard absorbed."""
        k = t.idempotency_keys.c
        with self.db.connect() as c:
            rows = c.execute(sa.select(k.key, k.duplicates).where(k.key.in_(keys)))
            return {key: int(n) for key, n in rows}

    def live_counts(self) -> LiveCounts:
        """Open instances by saga and state (stuck among them), and open dead letters by
        saga with the oldest; read from partial indexes only."""
        i, d = t.instances.c, t.dead_letters.c
        by_state = (
            sa.select(i.saga_name, i.state, sa.func.count(), sa.func.count(i.stuck_since))
            .where(_OPEN_SQL)
            .group_by(i.saga_name, i.state)
        )
        open_letters = (
            sa.select(d.saga_name, sa.func.count(), sa.func.min(d.created_at))
            .where(sa.text("saga_dead_letters.resolved_at IS NULL"))
            .group_by(d.saga_name)
        )
        instances: dict[tuple[str, str], int] = {}
        stuck: dict[str, int] = {}
        with self.db.connect() as c:
            for name, state, n, flagged in c.execute(by_state):
                instances[name, state] = int(n)
                stuck[name] = stuck.get(name, 0) + int(flagged)
            letters = {name: (int(n), int(oldest)) for name, n, oldest in c.execute(open_letters)}
        return LiveCounts(instances, stuck, letters)

    def _rows(self, query: sa.Select[Any]) -> list[Row]:
        with self.db.connect() as c:
            return list(c.execute(query).mappings().all())


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


def _failure_spans(c: Connection, saga_ids: list[str]) -> dict[tuple[str, int, str], Any]:
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
