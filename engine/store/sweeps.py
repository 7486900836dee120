"""The sweeps' questions to the store, and their marks: :class:`SweepQueries`.

Each reads a bounded batch along a partial index; each write re-checks its
condition, so running a sweep twice (or two at once) is harmless. The store
holds one as ``store.sweeps``; the sweeper (:mod:`engine.sweeper.passes`), the
doorbell and command recovery and the choreography tracker ask it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from engine.model import EventKind, idempotency_key
from engine.states import CompensationStatus, Phase, SagaState, StepStatus
from engine.store import schema as t
from engine.store.leases import ACTIVE, ACTIVE_SQL

# Literal predicates, as the partial indexes spell them (see engine.store.leases).
_FINISHED_SQL = sa.text(f"saga_instances.{t.FINISHED}")
_OPEN_LETTER_SQL = sa.text("saga_dead_letters.resolved_at IS NULL")

#: Adds the backend's row locks to a query that picks rows to change (see Store).
Lock = Callable[[sa.Select[Any]], sa.Select[Any]]


@dataclass(frozen=True)
class Overdue:
    """An active instance with work due (or an expired lease) that no live worker holds."""

    id: str
    saga_name: str
    saga_version: int
    #: Its current attempt is marked running: the worker that began it is gone.
    in_flight: bool


@dataclass(frozen=True)
class StuckCandidate:
    """An active, unflagged instance whose last progress is older than its step allows."""

    id: str
    version: int
    saga_name: str
    saga_version: int
    current_step: int
    state: SagaState
    correlation_id: str
    last_progress_at: int


@dataclass(frozen=True)
class StuckMark:
    """A candidate to flag stuck, with what its timeline event says."""

    candidate: StuckCandidate
    step_name: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class DeadLetterRef:
    """An open dead letter as the dead-letter sweep sees it."""

    id: int
    saga_id: str
    saga_name: str
    created_at: int
    auto_retries: int | None


class SweepQueries:
    """What the sweeps read and mark; ``lock`` adds the backend's row locks."""

    def __init__(self, db: Engine, lock: Lock) -> None:
        self.db = db
        self._lock = lock

    # -- overdue work and expired leases --------------------------------------------

    def overdue(self, now: int, due_before: int, limit: int) -> list[Overdue]:
        """Active instances due by ``due_before`` whose lease is free or expired, oldest first.

        An attempt in flight is due at its deadline, so this finds overdue
        deadlines as well as due work whose doorbell was lost.
        """
        i = t.instances.c
        free = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
        query = _overdue_select().where(ACTIVE_SQL, i.next_run_at <= due_before, free)
        return self._overdue(query.order_by(i.next_run_at).limit(limit))

    def expired_leases(self, now: int, limit: int) -> list[Overdue]:
        """Active instances whose lease expired: their worker died or lost the store."""
        i = t.instances.c
        query = _overdue_select().where(
            i.lease_owner.is_not(None), i.lease_expires_at < now, ACTIVE_SQL
        )
        return self._overdue(query.order_by(i.lease_expires_at).limit(limit))

    def _overdue(self, query: sa.Select[Any]) -> list[Overdue]:
        with self.db.connect() as c:
            return [
                Overdue(r.id, r.saga_name, r.saga_version, _in_flight(r)) for r in c.execute(query)
            ]

    def due_unleased(
        self, now: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` (next_run_at, id) of active instances due by ``now`` with a free
        lease, after ``after``, along the partial index on ``next_run_at``."""
        i = t.instances.c
        free = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
        query = sa.select(i.next_run_at, i.id).where(
            i.state.in_(ACTIVE), i.next_run_at <= now, free
        )
        if after is not None:
            query = query.where(sa.tuple_(i.next_run_at, i.id) > sa.tuple_(*after))
        query = query.order_by(i.next_run_at, i.id).limit(limit)
        with self.db.connect() as conn:
            return [(row.next_run_at, row.id) for row in conn.execute(query)]

    def remote_attempts_in_flight(
        self, now: int, sagas: list[tuple[str, int]], batch: int
    ) -> list[str]:
        """Ids of active instances of ``sagas`` whose current attempt runs, due after ``now``.

        An attempt in flight makes its deadline the instance's next_run_at, so
        they are among the active instances due later, along the due index.
        """
        i, s = t.instances.c, t.steps.c
        running = str(StepStatus.RUNNING)
        query = (
            sa.select(i.id)
            .join(t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step))
            .where(
                i.state.in_(ACTIVE),
                i.next_run_at > now,
                sa.tuple_(i.saga_name, i.saga_version).in_(sagas),
                sa.or_(s.status == running, s.comp_status == str(CompensationStatus.RUNNING)),
            )
            .order_by(i.next_run_at)
        )
        ids: list[str] = []
        with self.db.connect() as conn:
            for partition in conn.execution_options(yield_per=batch).execute(query).partitions():
                ids.extend(row.id for row in partition)
        return ids

    # -- stuck instances ------------------------------------------------------------

    def stuck_candidates(
        self, now: int, rules: Sequence[tuple[int, Sequence[tuple[str, int, int]]]], limit: int
    ) -> list[StuckCandidate]:
        """Unflagged active instances with no progress for longer than their step allows.

        ``rules`` pairs a threshold (ms) with the (saga, version, step index)
        it applies to; instances of sagas no rule names are left alone. An
        operator action (a person's or the sweeper's retry) starts the
        count again: a dead letter retried after a day is not stuck at once.
        """
        if not rules:
            return []
        i, a = t.instances.c, t.operator_actions.c
        shortest = min(ms for ms, _ in rules)
        each = [
            sa.and_(
                sa.tuple_(i.saga_name, i.saga_version, i.current_step).in_(list(keys)),
                i.last_progress_at < now - ms,
                ~sa.exists().where(a.saga_id == i.id, a.at >= now - ms),
            )
            for ms, keys in rules
        ]
        query = (
            sa.select(
                i.id,
                i.version,
                i.saga_name,
                i.saga_version,
                i.current_step,
                i.state,
                i.correlation_id,
                i.last_progress_at,
            )
            .where(ACTIVE_SQL, i.stuck_since.is_(None), i.last_progress_at < now - shortest)
            .where(sa.or_(*each))
            .order_by(i.last_progress_at)
            .limit(limit)
        )
        with self.db.connect() as c:
            return [_stuck_candidate(r) for r in c.execute(query)]

    def mark_stuck(self, marks: Sequence[StuckMark], now: int, actor: str) -> list[str]:
        """Set ``stuck_since`` and append a timeline event, in one transaction.

        Only instances still at the version the candidate was read at and
        not flagged yet are marked; returns their ids. The version is not
        bumped: a finding is not a transition, and must not make an
        operator's or a worker's version check fail.
        """
        if not marks:
            return []
        i = t.instances.c
        pairs = [(m.candidate.id, m.candidate.version) for m in marks]
        with self.db.begin() as c:
            flagged = set(
                c.execute(
                    t.instances.update()
                    .where(sa.tuple_(i.id, i.version).in_(pairs), i.stuck_since.is_(None))
                    .values(stuck_since=now)
                    .returning(i.id)
                ).scalars()
            )
            rows = [_stuck_event_row(m, actor, now) for m in marks if m.candidate.id in flagged]
            if rows:
                c.execute(t.events.insert(), rows)
                # A mark left from an earlier flag whose lifting was not noted yet is
                # replaced: the new flag is what the next note will be about.
                c.execute(t.stuck_marks.delete().where(t.stuck_marks.c.saga_id.in_(flagged)))
                c.execute(t.stuck_marks.insert(), [{"saga_id": i, "since": now} for i in flagged])
        return [m.candidate.id for m in marks if m.candidate.id in flagged]

    def note_stuck_cleared(self, now: int, actor: str, limit: int) -> int:
        """Note ``stuck_cleared`` on the timeline of up to ``limit`` flagged instances whose
        flag a stored change lifted since, and forget their marks (and those of purged
        instances). Returns how many were noted."""
        m, i = t.stuck_marks.c, t.instances.c
        query = (
            sa.select(m.saga_id, m.since, i.correlation_id, i.current_step)
            .select_from(t.stuck_marks.outerjoin(t.instances, i.id == m.saga_id))
            .where(sa.or_(i.id.is_(None), i.stuck_since.is_(None)))
            .order_by(m.since)
            .limit(limit)
        )
        with self.db.begin() as c:
            lifted = c.execute(query).all()
            if not lifted:
                return 0
            events = [_cleared_event_row(row, actor, now) for row in lifted if row.correlation_id]
            if events:
                c.execute(t.events.insert(), events)
            c.execute(t.stuck_marks.delete().where(m.saga_id.in_([r.saga_id for r in lifted])))
        return len(events)

    def acted_since(self, saga_id: str, since: int) -> bool:
        """Whether the sweeper has an audit-log entry on the instance at or after ``since``."""
        a = t.operator_actions.c
        query = sa.select(a.id).where(a.saga_id == saga_id, _by_the_sweeper(), a.at >= since)
        with self.db.connect() as c:
            return c.execute(query.limit(1)).first() is not None

    # -- dead letters -----------------------------------------------------------------

    def unplanned_dead_letters(self, sagas: Collection[str], limit: int) -> list[DeadLetterRef]:
        """Open dead letters of ``sagas`` that the dead-letter sweep has not planned yet."""
        d = t.dead_letters.c
        found: list[DeadLetterRef] = []
        # One saga type at a time, in no order: each reads the partial index of the
        # few unplanned ones. With ORDER BY id, PostgreSQL walked the primary key
        # instead, through every open dead letter.
        for name in sorted(sagas):
            query = (
                _dead_letter_select()
                .where(_OPEN_LETTER_SQL, d.auto_retries.is_(None))
                .where(d.saga_name == name)
                .limit(limit - len(found))
            )
            found += self._dead_letters(query)
            if len(found) >= limit:
                break
        return found

    def automatic_retries(self, saga_ids: Collection[str]) -> dict[str, int]:
        """Per instance, how many times the sweeper retried it out of the dead-letter queue."""
        if not saga_ids:
            return {}
        a = t.operator_actions.c
        query = (
            sa.select(a.saga_id, sa.func.count())
            .where(a.saga_id.in_(list(saga_ids)), _by_the_sweeper())
            .where(a.action == "retry", a.state_before == "failed")
            .group_by(a.saga_id)
        )
        with self.db.connect() as c:
            return {str(saga_id): int(n) for saga_id, n in c.execute(query)}

    def plan_dead_letters(self, plans: Sequence[tuple[int, int, int | None]]) -> None:
        """Record (dead letter id, automatic retries so far, retry at or None) for each."""
        if not plans:
            return
        d = t.dead_letters.c
        statement = (
            t.dead_letters.update()
            .where(d.id == sa.bindparam("b_id"), d.resolved_at.is_(None), d.auto_retries.is_(None))
            .values(auto_retries=sa.bindparam("n"), auto_retry_at=sa.bindparam("at"))
        )
        with self.db.begin() as c:
            c.execute(statement, [{"b_id": i, "n": n, "at": at} for i, n, at in plans])

    def due_dead_letters(self, now: int, limit: int) -> list[DeadLetterRef]:
        """Open dead letters whose automatic retry is due, the longest waiting first."""
        d = t.dead_letters.c
        query = (
            _dead_letter_select()
            .where(_OPEN_LETTER_SQL, d.auto_retry_at.is_not(None))
            .where(d.auto_retry_at <= now)
            .order_by(d.auto_retry_at)
            .limit(limit)
        )
        return self._dead_letters(query)

    def _dead_letters(self, query: sa.Select[Any]) -> list[DeadLetterRef]:
        with self.db.connect() as c:
            return [
                DeadLetterRef(r.id, r.saga_id, r.saga_name, r.created_at, r.auto_retries)
                for r in c.execute(query)
            ]

    def drop_auto_retry(self, dead_letter_id: int) -> None:
        """Give up the automatic retry of one dead letter: it waits for a person."""
        d = t.dead_letters.c
        with self.db.begin() as c:
            c.execute(
                t.dead_letters.update().where(d.id == dead_letter_id).values(auto_retry_at=None)
            )

    # -- retention --------------------------------------------------------------------

    def purge_finished(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` finished instances last updated before ``before``, oldest
        first, with their steps, events, dead letters and signals, and the idempotency keys
        of their steps where participants keep them in this database; the audit log stays.
        Returns how many went."""
        i = t.instances.c
        with self.db.begin() as c:
            pick = (
                sa.select(i.id)
                .where(_FINISHED_SQL, i.updated_at < before)
                .order_by(i.updated_at)
                .limit(limit)
            )
            ids = list(c.execute(self._lock(pick)).scalars())
            if not ids:
                return 0
            # A finished saga runs no step again, so its keys guard nothing any more.
            steps = c.execute(
                sa.select(t.steps.c.saga_id, t.steps.c.name).where(t.steps.c.saga_id.in_(ids))
            )
            keys = [idempotency_key(row.saga_id, row.name, p) for row in steps for p in Phase]
            k = t.idempotency_keys.c
            for first in range(0, len(keys), 1000):
                c.execute(t.idempotency_keys.delete().where(k.key.in_(keys[first : first + 1000])))
            for table in (t.events, t.dead_letters, t.signals, t.steps, t.stuck_marks):
                c.execute(table.delete().where(table.c.saga_id.in_(ids)))
            c.execute(t.instances.delete().where(i.id.in_(ids), _FINISHED_SQL))
        return len(ids)


def _overdue_select() -> sa.Select[Any]:
    i, s = t.instances.c, t.steps.c
    return sa.select(i.id, i.saga_name, i.saga_version, i.state, s.status, s.comp_status).join(
        t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step)
    )


def _in_flight(row: Any) -> bool:
    if row.state == SagaState.COMPENSATING:
        return bool(row.comp_status == CompensationStatus.RUNNING)
    return bool(row.status == StepStatus.RUNNING)


def _stuck_candidate(row: Any) -> StuckCandidate:
    return StuckCandidate(
        id=row.id,
        version=row.version,
        saga_name=row.saga_name,
        saga_version=row.saga_version,
        current_step=row.current_step,
        state=SagaState(row.state),
        correlation_id=row.correlation_id,
        last_progress_at=row.last_progress_at,
    )


def _stuck_event_row(mark: StuckMark, actor: str, now: int) -> dict[str, Any]:
    found = mark.candidate
    phase = Phase.COMPENSATE if found.state is SagaState.COMPENSATING else Phase.ACTION
    return _note(found.id, found.correlation_id, EventKind.STUCK_DETECTED, actor, now) | {
        "step_index": found.current_step,
        "step_name": mark.step_name,
        "phase": str(phase),
        "detail": mark.detail,
    }


def _cleared_event_row(row: Any, actor: str, now: int) -> dict[str, Any]:
    return _note(row.saga_id, row.correlation_id, EventKind.STUCK_CLEARED, actor, now) | {
        "detail": {
            "flagged_at": row.since,
            "why": "it changed after it was flagged (a step began or ended, or someone acted)",
        },
    }


def _note(
    saga_id: str, correlation_id: str, kind: EventKind, actor: str, now: int
) -> dict[str, Any]:
    """A timeline row of the sweeps' own: no step, attempt or error unless they add one."""
    return {
        "saga_id": saga_id,
        "correlation_id": correlation_id,
        "at": now,
        "kind": str(kind),
        "step_index": None,
        "step_name": None,
        "phase": None,
        "attempt": None,
        "actor": actor,
        "error": None,
        "traceback": None,
        "detail": None,
    }


def _dead_letter_select() -> sa.Select[Any]:
    d = t.dead_letters.c
    return sa.select(d.id, d.saga_id, d.saga_name, d.created_at, d.auto_retries)


def _by_the_sweeper() -> sa.ColumnElement[bool]:
    """Audit entries the sweeper wrote: by their origin, which only the sweeper's own door
    records (an operator's ``--actor sweeper`` is a claim, recorded from the CLI). Entries
    from before origins were recorded (``unknown``) are judged by their actor."""
    a = t.operator_actions.c
    return sa.or_(a.origin == "sweeper", sa.and_(a.origin == "unknown", a.actor == "sweeper"))
