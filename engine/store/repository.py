"""The store: the only code that reads and writes the saga tables.

Every state change goes through :meth:`Store.save`, one transaction holding
the instance row (version-checked), the step rows that changed, the timeline
events and any dead-letter record. Backend quirks live in the two
subclasses; :func:`open_store` picks one from the URL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import DBAPIError

from engine import metrics
from engine.errors import ConcurrencyConflict, InvalidInput, SagaNotFound
from engine.model import (
    Event,
    EventKind,
    Instance,
    StepState,
    Transition,
    idempotency_key,
    now_ms,
)
from engine.states import ACTIVE_STATES, CompensationStatus, Phase, SagaState, StepStatus
from engine.store import schema as t

log = logging.getLogger(__name__)

_ACTIVE = [s.value for s in ACTIVE_STATES]
_STEP_FIELDS = [f.name for f in fields(StepState) if f.name != "index"]
_INSTANCE_FIELDS = ["state", "current_step", "updated_at", "last_progress_at", "next_run_at"]
# Literal state predicates, as the partial indexes spell them: with a bound
# parameter, a prepared statement's generic plan could not prove that the
# partial index applies and would scan the whole table instead.
_ACTIVE_SQL = sa.text(f"saga_instances.{t.ACTIVE}")
_FINISHED_SQL = sa.text(f"saga_instances.{t.FINISHED}")
_OPEN_SQL = sa.text(f"saga_instances.{t.OPEN}")


def _build_save_statement(with_owner: bool, release: bool) -> sa.Update:
    # Built once: constructing statements per call costs more CPU than running them.
    i = t.instances.c
    cond = [i.id == sa.bindparam("b_id"), i.version == sa.bindparam("b_version")]
    if with_owner:
        cond.append(i.lease_owner == sa.bindparam("b_owner"))
    values: dict[str, Any] = {name: sa.bindparam(name) for name in _INSTANCE_FIELDS}
    values["version"] = sa.bindparam("b_version") + 1
    # Any stored transition is progress, so it clears the stuck sweep's finding.
    values["stuck_since"] = None
    if release:
        values.update(lease_owner=None, lease_expires_at=None)
    return t.instances.update().where(*cond).values(values)


_SAVE = {(o, r): _build_save_statement(o, r) for o in (False, True) for r in (False, True)}
_UPDATE_STEP = (
    t.steps.update()
    .where(
        t.steps.c.saga_id == sa.bindparam("b_saga_id"),
        t.steps.c.step_index == sa.bindparam("b_index"),
    )
    .values({name: sa.bindparam(name) for name in _STEP_FIELDS})
)


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


@dataclass(frozen=True)
class StoredSignal:
    """A signal as stored: its data, when it came and who sent it."""

    event: str
    data: Any
    received_at: int
    sent_by: str


@dataclass(frozen=True)
class OperatorRecord:
    """An operator action to append to the audit log with its transition."""

    actor: str
    action: str
    reason: str
    detail: dict[str, Any] | None = None


class Store:
    """Saga instances, their steps, timeline, dead letters and audit log, in SQL."""

    dialect = "generic"

    def __init__(self, db: SAEngine) -> None:
        self.db = db

    # -- transactions -------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One database transaction; commits on success, rolls back on error."""
        with self.db.begin() as conn:
            yield conn

    def dispose(self) -> None:
        self.db.dispose()

    # -- writes -------------------------------------------------------------

    def create(
        self,
        transition: Transition,
        actor: str,
        conn: Connection | None = None,
    ) -> tuple[Instance, bool]:
        """Insert a new instance; with an idempotency key already used, return that one."""
        with self._single_statement(conn) as c:
            inst = transition.instance
            if not self._insert_new(c, transition, actor):
                existing = (
                    self._load(c, inst.id)
                    if inst.idempotency_key is None
                    else self._find_by_idempotency_key(c, inst.saga_name, inst.idempotency_key)
                )
                if existing.id != inst.id:
                    return existing, False
                # This very insert: an earlier try committed before its connection
                # dropped (retry_on_disconnect), so the instance is new all the same.
        metrics.transition_saved(None, inst, transition.events)
        return inst, True

    def _insert_new(self, c: Connection, transition: Transition, actor: str) -> bool:
        """Insert instance, steps and events; False if the idempotency key is taken."""
        inst = transition.instance
        if not self._insert_instance(c, _instance_row(inst)):
            return False
        c.execute(t.steps.insert(), [_step_row(inst.id, s) for s in inst.steps])
        self._append_events(c, inst, transition.events, actor, inst.created_at)
        return True

    def save(
        self,
        old: Instance,
        transition: Transition,
        actor: str,
        *,
        owner: str | None = None,
        release: bool = False,
        conn: Connection | None = None,
        operator: OperatorRecord | None = None,
    ) -> Instance:
        """Store ``transition`` on top of ``old``; raises ConcurrencyConflict if it moved on.

        ``owner`` adds a lease check (workers); ``release`` drops the lease in
        the same statement, saving a round trip when the worker is done.
        """
        new = transition.instance
        now = new.updated_at
        with self._tx(conn) as c:
            params = _instance_changes(new)
            params.update(b_id=old.id, b_version=old.version, b_owner=owner)
            done = c.execute(_SAVE[owner is not None, release], params).rowcount
            if done != 1:
                raise self._conflict(c, old, owner)
            self._update_steps(c, old, new)
            self._append_events(c, new, transition.events, actor, now)
            if transition.dead_letter is not None:
                self._insert_dead_letter(c, new, transition, now)
            if transition.resolves_dead_letter:
                self._resolve_dead_letters(c, new.id, actor, operator, now)
            if operator is not None:
                self._insert_operator_action(
                    c, old, operator, now, after=(new.state, old.version + 1)
                )
        metrics.transition_saved(old, new, transition.events)
        lease = {"lease_owner": None, "lease_expires_at": None} if release else {}
        return _replace(new, version=old.version + 1, **lease)

    def save_many(
        self, changes: Sequence[tuple[Instance, Transition]], actor: str, conn: Connection
    ) -> list[Instance]:
        """:meth:`save` for many instances in one go (no lease check), so that a batch
        costs a few round trips, not a few per instance.

        Raises ConcurrencyConflict, without saying which, if any of them moved
        on: the caller's transaction must then be rolled back as a whole.
        Changes to one instance may follow each other, each on the last.
        """
        if not changes:
            return []
        self._save_batch(conn, changes, actor)
        for old, tr in changes:
            if tr.dead_letter is not None:
                self._insert_dead_letter(conn, tr.instance, tr, tr.instance.updated_at)
            metrics.transition_saved(old, tr.instance, tr.events)
        return [_replace(tr.instance, version=old.version + 1) for old, tr in changes]

    def _save_batch(
        self, conn: Connection, changes: Sequence[tuple[Instance, Transition]], actor: str
    ) -> None:
        # One executemany each for the instances, their steps and their events.
        params = []
        for old, transition in changes:
            row = _instance_changes(transition.instance)
            row.update(b_id=old.id, b_version=old.version, b_owner=None)
            params.append(row)
        done = conn.execute(_SAVE[False, False], params).rowcount
        if done != len(params):
            raise _batch_conflict(changes, len(params) - done)
        steps = [
            {"b_saga_id": new.id, "b_index": st.index, **_step_values(st)}
            for old, tr in changes
            for new in (tr.instance,)
            for st, before in zip(new.steps, old.steps, strict=True)
            if st != before
        ]
        if steps:
            conn.execute(_UPDATE_STEP, steps)
        events = _batch_events(changes, actor)
        if events:
            conn.execute(t.events.insert(), events)

    def set_payload(self, saga_id: str, payload: Any, conn: Connection) -> None:
        """Replace an instance's payload, inside the transaction that saved an operator's
        edit (:meth:`save` never writes the payload: it does not change as a saga runs)."""
        c = t.instances.c
        conn.execute(t.instances.update().where(c.id == saga_id).values(payload=payload))

    def append_operator_note(
        self,
        inst: Instance,
        op: OperatorRecord,
        now: int,
        conn: Connection | None = None,
        *,
        step_name: str | None = None,
    ) -> None:
        """Append an audit entry that changed nothing (state and version stay as they are);
        ``step_name``: the step it concerns, when not the current one."""
        with self._tx(conn) as c:
            self._insert_operator_action(
                c, inst, op, now, after=(inst.state, inst.version), step_name=step_name
            )

    def append_events(
        self,
        inst: Instance,
        events: Sequence[Event],
        actor: str,
        now: int,
        conn: Connection | None = None,
    ) -> None:
        """Append events without touching the instance (a late result, a note)."""
        with self._tx(conn) as c:
            self._append_events(c, inst, events, actor, now)

    def add_event_dead_letter(
        self,
        *,
        handler: str,
        event_id: str | None,
        event_type: str | None,
        correlation_id: str | None,
        reason: str,
        attempts: int,
        fields: dict[str, str] | None,
    ) -> None:
        """Record a domain event a handler gave up on, or could not read (choreography)."""
        with self.transaction() as c:
            c.execute(
                t.event_dead_letters.insert().values(
                    at=now_ms(),
                    handler=handler[:200],
                    event_id=event_id[:200] if event_id else None,
                    event_type=event_type[:200] if event_type else None,
                    correlation_id=correlation_id[:200] if correlation_id else None,
                    reason=reason,
                    attempts=attempts,
                    fields=fields,
                )
            )

    def event_dead_letters(self, limit: int = 200) -> list[dict[str, Any]]:
        """Dead-lettered domain events, newest first."""
        d = t.event_dead_letters.c
        with self.db.connect() as c:
            rows = c.execute(sa.select(t.event_dead_letters).order_by(d.id.desc()).limit(limit))
            return [dict(r) for r in rows.mappings()]

    # -- leases -------------------------------------------------------------

    def claim(self, saga_id: str, owner: str, ttl_ms: int, now: int) -> Instance | None:
        """Take the lease on one active instance if nobody holds it; None if taken or idle."""
        with self.transaction() as c:
            i = t.instances.c
            taken = c.execute(
                t.instances.update()
                .where(
                    i.id == saga_id,
                    i.state.in_(_ACTIVE),
                    # Not re-entrant for ``owner``: a second thread (or a process
                    # reusing the worker id) would run the same step concurrently.
                    sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now),
                )
                .values(lease_owner=owner, lease_expires_at=now + ttl_ms)
            ).rowcount
            return self._load(c, saga_id) if taken else None

    def claim_due(
        self,
        owner: str,
        ttl_ms: int,
        now: int,
        limit: int,
        sagas: Collection[tuple[str, int]] | None = None,
    ) -> list[str]:
        """Lease up to ``limit`` instances whose work is due or whose lease expired.

        ``sagas`` limits the claim to the (name, version) pairs the caller can
        run: instances it cannot run would otherwise come first every time
        and starve the rest.
        """
        with self.transaction() as c:
            ids = self._select_claimable(c, now, limit, sagas)
            if not ids:
                return []
            i = t.instances.c
            c.execute(
                t.instances.update()
                .where(i.id.in_(ids))
                .values(lease_owner=owner, lease_expires_at=now + ttl_ms)
            )
            return ids

    def renew(self, owner: str, saga_ids: Sequence[str], ttl_ms: int, now: int) -> int:
        """Extend the leases ``owner`` still holds (the heartbeat); returns how many."""
        if not saga_ids:
            return 0
        with self.transaction() as c:
            i = t.instances.c
            return int(
                c.execute(
                    t.instances.update()
                    .where(i.id.in_(list(saga_ids)), i.lease_owner == owner)
                    .values(lease_expires_at=now + ttl_ms)
                ).rowcount
            )

    def release(self, saga_id: str, owner: str) -> None:
        with self.transaction() as c:
            i = t.instances.c
            c.execute(
                t.instances.update()
                .where(i.id == saga_id, i.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # -- sweeps -------------------------------------------------------------
    # Each reads a bounded batch along a partial index; each write re-checks
    # its condition, so running a sweep twice (or two at once) is harmless.

    def overdue(self, now: int, due_before: int, limit: int) -> list[Overdue]:
        """Active instances due by ``due_before`` whose lease is free or expired, oldest first.

        An attempt in flight is due at its deadline, so this finds overdue
        deadlines as well as due work whose doorbell was lost.
        """
        i = t.instances.c
        free = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
        query = _overdue_select().where(_ACTIVE_SQL, i.next_run_at <= due_before, free)
        return self._overdue(query.order_by(i.next_run_at).limit(limit))

    def expired_leases(self, now: int, limit: int) -> list[Overdue]:
        """Active instances whose lease expired: their worker died or lost the store."""
        i = t.instances.c
        query = _overdue_select().where(
            i.lease_owner.is_not(None), i.lease_expires_at < now, _ACTIVE_SQL
        )
        return self._overdue(query.order_by(i.lease_expires_at).limit(limit))

    def _overdue(self, query: sa.Select[Any]) -> list[Overdue]:
        with self.db.connect() as c:
            return [
                Overdue(r.id, r.saga_name, r.saga_version, _in_flight(r)) for r in c.execute(query)
            ]

    def settle_if_free(
        self, saga_id: str, now: int, actor: str, settle: Callable[[Instance], Transition]
    ) -> Instance | None:
        """In one transaction: lock the instance if it is active and no live lease holds
        it, and store what ``settle`` makes of it, with the lease cleared.

        None when a worker holds it, it finished or vanished, or ``settle`` had
        nothing to record. The row lock (PostgreSQL; SQLite's write lock) keeps
        a worker from claiming it meanwhile: one commit, where a claim and a save
        would take two.
        """
        i = t.instances.c
        free = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
        with self.transaction() as c:
            found = sa.select(i.id).where(i.id == saga_id, _ACTIVE_SQL, free)
            if c.execute(self._lock_claimable(found)).first() is None:
                return None
            inst = self._load(c, saga_id)
            transition = settle(inst)
            if not transition.events:
                return None
            return self.save(inst, transition, actor, release=True, conn=c)

    def clear_expired_lease(self, saga_id: str, now: int) -> bool:
        """Drop a lease that expired (whoever held it); False if it was renewed or taken."""
        i = t.instances.c
        with self.transaction() as c:
            done = c.execute(
                t.instances.update()
                .where(i.id == saga_id, i.lease_owner.is_not(None), i.lease_expires_at < now)
                .values(lease_owner=None, lease_expires_at=None)
            ).rowcount
        return bool(done)

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
            .where(_ACTIVE_SQL, i.stuck_since.is_(None), i.last_progress_at < now - shortest)
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
        with self.transaction() as c:
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
        with self.transaction() as c:
            lifted = c.execute(query).all()
            if not lifted:
                return 0
            events = [_cleared_event_row(row, actor, now) for row in lifted if row.correlation_id]
            if events:
                c.execute(t.events.insert(), events)
            c.execute(t.stuck_marks.delete().where(m.saga_id.in_([r.saga_id for r in lifted])))
        return len(events)

    def acted_since(self, saga_id: str, actor: str, since: int) -> bool:
        """Whether ``actor`` has an audit-log entry on the instance at or after ``since``."""
        a = t.operator_actions.c
        query = sa.select(a.id).where(a.saga_id == saga_id, a.actor == actor, a.at >= since)
        with self.db.connect() as c:
            return c.execute(query.limit(1)).first() is not None

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
                .where(sa.text("saga_dead_letters.resolved_at IS NULL"), d.auto_retries.is_(None))
                .where(d.saga_name == name)
                .limit(limit - len(found))
            )
            found += self._dead_letters(query)
            if len(found) >= limit:
                break
        return found

    def automatic_retries(self, saga_ids: Collection[str], resolved_by: str) -> dict[str, int]:
        """Per instance, how many of its dead letters ``resolved_by`` closed with a retry."""
        if not saga_ids:
            return {}
        d = t.dead_letters.c
        query = (
            sa.select(d.saga_id, sa.func.count())
            .where(d.saga_id.in_(list(saga_ids)), d.resolved_by == resolved_by)
            .where(d.resolution == "retry")
            .group_by(d.saga_id)
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
        with self.transaction() as c:
            c.execute(statement, [{"b_id": i, "n": n, "at": at} for i, n, at in plans])

    def due_dead_letters(self, now: int, limit: int) -> list[DeadLetterRef]:
        """Open dead letters whose automatic retry is due, the longest waiting first."""
        d = t.dead_letters.c
        query = (
            _dead_letter_select()
            .where(sa.text("saga_dead_letters.resolved_at IS NULL"), d.auto_retry_at.is_not(None))
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
        with self.transaction() as c:
            c.execute(
                t.dead_letters.update().where(d.id == dead_letter_id).values(auto_retry_at=None)
            )

    def purge_finished(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` finished instances last updated before ``before``, oldest
        first, with their steps, events, dead letters and signals, and the idempotency keys
        of their steps where participants keep them in this database; the audit log stays.
        Returns how many went."""
        i = t.instances.c
        with self.transaction() as c:
            pick = (
                sa.select(i.id)
                .where(_FINISHED_SQL, i.updated_at < before)
                .order_by(i.updated_at)
                .limit(limit)
            )
            ids = list(c.execute(self._lock_claimable(pick)).scalars())
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

    def live_counts(self) -> metrics.LiveCounts:
        """The metrics' gauges: open instances by saga and state (stuck among them), and
        open dead letters by saga with the oldest; read from partial indexes only."""
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
        return metrics.LiveCounts(instances, stuck, letters)

    def due_unleased(
        self, now: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` (next_run_at, id) of active instances due by ``now`` with a free
        lease, after ``after``, along the partial index on ``next_run_at``."""
        i = t.instances.c
        free = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
        query = sa.select(i.next_run_at, i.id).where(
            i.state.in_(_ACTIVE), i.next_run_at <= now, free
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
                i.state.in_(_ACTIVE),
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

    def stored_signal(self, saga_id: str, event: str) -> StoredSignal | None:
        """The signal stored for ``event`` on ``saga_id``, if one came."""
        s = t.signals.c
        query = sa.select(s.data, s.received_at, s.sent_by).where(
            s.saga_id == saga_id, s.event == event
        )
        with self.db.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return StoredSignal(event, row.data, row.received_at, row.sent_by)

    def insert_signal(
        self, conn: Connection, saga_id: str, event: str, data: Any, sent_by: str, now: int
    ) -> bool:
        """Store a signal in ``conn``'s transaction; False when one for ``event`` is there."""
        row = {"event": event, "data": data, "sent_by": sent_by}
        try:
            with conn.begin_nested():
                conn.execute(t.signals.insert().values(saga_id=saga_id, received_at=now, **row))
        except sa.exc.IntegrityError:
            return False
        return True

    # -- reads --------------------------------------------------------------

    def load(self, saga_id: str, conn: Connection | None = None) -> Instance:
        with self._tx(conn) as c:
            return self._load(c, saga_id)

    def load_many(
        self, saga_ids: Collection[str], conn: Connection | None = None
    ) -> dict[str, Instance]:
        """The instances with these ids, by id, in two queries; missing ids are left out."""
        ids = list(saga_ids)
        if not ids:
            return {}
        with self._tx(conn) as c:
            rows = c.execute(sa.select(t.instances).where(t.instances.c.id.in_(ids))).mappings()
            found = {row["id"]: row for row in rows}
            step_rows: dict[str, list[Any]] = {saga_id: [] for saga_id in found}
            query = (
                sa.select(t.steps)
                .where(t.steps.c.saga_id.in_(list(found)))
                .order_by(t.steps.c.saga_id, t.steps.c.step_index)
            )
            for step in c.execute(query).mappings():
                step_rows[step["saga_id"]].append(step)
        return {i: _instance_from_rows(row, step_rows[i]) for i, row in found.items()}

    def _load(self, c: Connection, saga_id: str) -> Instance:
        row = (
            c.execute(sa.select(t.instances).where(t.instances.c.id == saga_id)).mappings().first()
        )
        if row is None:
            raise SagaNotFound(saga_id)
        step_rows = (
            c.execute(
                sa.select(t.steps)
                .where(t.steps.c.saga_id == saga_id)
                .order_by(t.steps.c.step_index)
            )
            .mappings()
            .all()
        )
        return _instance_from_rows(row, step_rows)

    def find_by_key(self, saga_name: str, idempotency_key: str) -> Instance | None:
        """The instance of ``saga_name`` started with ``idempotency_key``, if any."""
        i = t.instances.c
        with self.db.connect() as c:
            saga_id = c.execute(
                sa.select(i.id).where(
                    i.saga_name == saga_name, i.idempotency_key == idempotency_key
                )
            ).scalar_one_or_none()
            return None if saga_id is None else self._load(c, saga_id)

    def _find_by_idempotency_key(self, c: Connection, name: str, key: str | None) -> Instance:
        i = t.instances.c
        saga_id = c.execute(
            sa.select(i.id).where(i.saga_name == name, i.idempotency_key == key)
        ).scalar_one()
        return self._load(c, saga_id)

    # -- backend quirks -----------------------------------------------------

    def _insert_instance(self, c: Connection, row: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _select_claimable(
        self,
        c: Connection,
        now: int,
        limit: int,
        sagas: Collection[tuple[str, int]] | None = None,
    ) -> list[str]:
        i = t.instances.c
        due = sa.and_(i.lease_owner.is_(None), i.next_run_at <= now)
        expired = sa.and_(i.lease_owner.is_not(None), i.lease_expires_at < now)
        query = (
            sa.select(i.id)
            .where(i.state.in_(_ACTIVE), sa.or_(due, expired))
            .order_by(i.next_run_at)
            .limit(limit)
        )
        if sagas is not None:
            query = query.where(sa.tuple_(i.saga_name, i.saga_version).in_(list(sagas)))
        return list(c.execute(self._lock_claimable(query)).scalars())

    def _lock_claimable(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query

    # -- helpers ------------------------------------------------------------

    @contextmanager
    def _tx(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.db.begin() as c:
                yield c

    def _single_statement(self, conn: Connection | None) -> AbstractContextManager[Connection]:
        """A transaction for work that is one statement where the backend can make it so."""
        return self._tx(conn)

    def _conflict(self, c: Connection, old: Instance, owner: str | None) -> ConcurrencyConflict:
        i = t.instances.c
        row = c.execute(sa.select(i.version, i.lease_owner).where(i.id == old.id)).first()
        if row is None:
            return ConcurrencyConflict(old.id, old.version, None)
        detail = ""
        if owner is not None and row.lease_owner != owner:
            detail = f"the lease is now held by {row.lease_owner or 'nobody'}"
        return ConcurrencyConflict(old.id, old.version, row.version, detail)

    def _update_steps(self, c: Connection, old: Instance, new: Instance) -> None:
        changed = [
            {"b_saga_id": new.id, "b_index": s.index, **_step_values(s)}
            for s, before in zip(new.steps, old.steps, strict=True)
            if s != before
        ]
        if changed:  # one executemany: psycopg pipelines the rows in one round trip
            c.execute(_UPDATE_STEP, changed)

    def _append_events(
        self, c: Connection, inst: Instance, evs: Sequence[Event], actor: str, now: int
    ) -> None:
        if not evs:
            return
        c.execute(t.events.insert(), [_event_row(inst, e, actor, now) for e in evs])

    def _insert_dead_letter(self, c: Connection, inst: Instance, tr: Transition, now: int) -> None:
        dl = tr.dead_letter
        assert dl is not None
        c.execute(
            t.dead_letters.insert().values(
                saga_id=inst.id,
                saga_name=inst.saga_name,
                step_index=dl.step_index,
                step_name=inst.steps[dl.step_index].name,
                phase=str(dl.phase),
                error=dl.error,
                traceback=dl.traceback,
                attempts=dl.attempts,
                created_at=now,
            )
        )

    def _resolve_dead_letters(
        self, c: Connection, saga_id: str, actor: str, operator: OperatorRecord | None, now: int
    ) -> None:
        d = t.dead_letters.c
        c.execute(
            t.dead_letters.update()
            .where(d.saga_id == saga_id, d.resolved_at.is_(None))
            .values(
                resolved_at=now,
                resolved_by=actor,
                resolution=operator.action if operator else "resolved",
            )
        )

    def _insert_operator_action(
        self,
        c: Connection,
        old: Instance,
        op: OperatorRecord,
        now: int,
        *,
        after: tuple[SagaState, int],
        step_name: str | None = None,
    ) -> None:
        """The audit row of ``op`` on ``old``; ``after``: the state and version it left."""
        c.execute(
            t.operator_actions.insert().values(
                at=now,
                actor=op.actor,
                action=op.action,
                saga_id=old.id,
                reason=op.reason,
                state_before=str(old.state),
                state_after=str(after[0]),
                version_before=old.version,
                version_after=after[1],
                step_name=step_name or old.current.name,
                detail=op.detail,
            )
        )


class SqliteStore(Store):
    """SQLite: one writer at a time, so claims need no row locks."""

    dialect = "sqlite"

    def _insert_instance(self, c: Connection, row: dict[str, Any]) -> bool:
        from sqlalchemy.dialects.sqlite import insert

        # RETURNING, not rowcount: SQLAlchemy does not keep an INSERT's rowcount
        # (psycopg reports -1 once the cursor is closed), so a conflict looked
        # like a success.
        stmt = insert(t.instances).values(row).on_conflict_do_nothing()
        return c.execute(stmt.returning(t.instances.c.id)).first() is not None


class PostgresStore(Store):
    """PostgreSQL: bulk claims skip rows other workers have locked, and a new
    instance is inserted with its steps and events in one statement."""

    dialect = "postgresql"

    def __init__(self, db: SAEngine) -> None:
        super().__init__(db)
        # The same pool; a connection taken through it runs each statement as
        # its own transaction, and is set back when returned.
        self._autocommit = db.execution_options(isolation_level="AUTOCOMMIT")

    def _insert_new(self, c: Connection, transition: Transition, actor: str) -> bool:
        # One round trip instead of three: on the inline path this statement
        # and the steps' own writes are all a saga costs before its commit.
        inst = transition.instance
        params = {
            "instance": _json(_instance_row(inst)),
            "steps": _json([_step_row(inst.id, s) for s in inst.steps]),
            "events": _json(
                [_event_row(inst, e, actor, inst.created_at) for e in transition.events]
            ),
        }
        return c.execute(_PG_INSERT_NEW, params).first() is not None

    def _save_batch(
        self, conn: Connection, changes: Sequence[tuple[Instance, Transition]], actor: str
    ) -> None:
        # One statement for the whole batch: a reply listener records dozens of
        # replies per transaction, and a row-by-row executemany made PostgreSQL
        # plan and run some eight statements per reply. Several changes to one
        # instance become one update to its last state, its version moved by
        # their number, since a single UPDATE sees each row once.
        first: dict[str, Instance] = {}
        last: dict[str, Instance] = {}
        moves: dict[str, int] = {}
        for old, transition in changes:
            first.setdefault(old.id, old)
            last[old.id] = transition.instance
            moves[old.id] = moves.get(old.id, 0) + 1
        instances = [
            {
                **_instance_changes(new),
                "id": saga_id,
                "b_version": first[saga_id].version,
                "version": first[saga_id].version + moves[saga_id],
            }
            for saga_id, new in last.items()
        ]
        steps = [
            _step_row(saga_id, st)
            for saga_id, new in last.items()
            for st, before in zip(new.steps, first[saga_id].steps, strict=True)
            if st != before
        ]
        params = {
            "instances": _json(instances),
            "steps": _json(steps),
            "events": _json(_batch_events(changes, actor)),
        }
        done = conn.execute(_PG_SAVE_MANY, params).scalar_one()
        if done != len(instances):
            raise _batch_conflict(changes, len(instances) - done)

    @contextmanager
    def _single_statement(self, conn: Connection | None) -> Iterator[Connection]:
        # A new instance is one INSERT statement here, atomic on its own: run in
        # autocommit it saves the BEGIN and the COMMIT, two of the three
        # statements (and round trips) a start costs PostgreSQL.
        if conn is not None:
            yield conn
            return
        with self._autocommit.connect() as c:
            yield c

    def _insert_instance(self, c: Connection, row: dict[str, Any]) -> bool:
        from sqlalchemy.dialects.postgresql import insert

        # RETURNING, not rowcount: SQLAlchemy does not keep an INSERT's rowcount
        # (psycopg reports -1 once the cursor is closed), so a conflict looked
        # like a success.
        stmt = insert(t.instances).values(row).on_conflict_do_nothing()
        return c.execute(stmt.returning(t.instances.c.id)).first() is not None

    def _lock_claimable(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)


def _populate(
    table: sa.Table,
    source: str,
    skip: tuple[str, ...] = (),
    guard: str = "WHERE EXISTS (SELECT 1 FROM i) ",
) -> str:
    """INSERT the rows of the JSON array ``:source`` into ``table``, in their order."""
    cols = ", ".join(c.name for c in table.columns if c.name not in skip)
    return (
        f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM "
        f"jsonb_populate_recordset(NULL::{table.name}, CAST(:{source} AS jsonb)) "
        f"WITH ORDINALITY AS r {guard}ORDER BY r.ordinality"
    )


_INSTANCE_COLUMNS = ", ".join(c.name for c in t.instances.columns)
_PG_INSERT_NEW = sa.text(
    f"WITH i AS (INSERT INTO saga_instances ({_INSTANCE_COLUMNS}) SELECT {_INSTANCE_COLUMNS} "
    "FROM jsonb_populate_record(NULL::saga_instances, CAST(:instance AS jsonb)) "
    "ON CONFLICT DO NOTHING RETURNING id), "
    f"s AS ({_populate(t.steps, 'steps')}), "
    f"e AS ({_populate(t.events, 'events', skip=('id',))}) "
    "SELECT id FROM i"
)

_CHANGE_TYPES = {"state": "text", "current_step": "integer"} | {
    name: "bigint" for name in ("updated_at", "last_progress_at", "next_run_at")
}
_PG_SAVE_MANY = sa.text(
    "WITH c AS (SELECT * FROM jsonb_to_recordset(CAST(:instances AS jsonb)) AS c(id text, "
    "b_version integer, version integer, "
    + ", ".join(f"{name} {kind}" for name, kind in _CHANGE_TYPES.items())
    + ")), "
    "i AS (UPDATE saga_instances AS x SET version = c.version, stuck_since = NULL, "
    + ", ".join(f"{name} = c.{name}" for name in _CHANGE_TYPES)
    + " FROM c WHERE x.id = c.id AND x.version = c.b_version RETURNING x.id), "
    "s AS (UPDATE saga_steps AS x SET "
    + ", ".join(f"{name} = r.{name}" for name in _STEP_FIELDS)
    + " FROM jsonb_populate_recordset(NULL::saga_steps, CAST(:steps AS jsonb)) AS r "
    "WHERE x.saga_id = r.saga_id AND x.step_index = r.step_index), "
    f"e AS ({_populate(t.events, 'events', skip=('id',), guard='')}) "
    "SELECT count(*) FROM i"
)


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
    return {
        "saga_id": found.id,
        "correlation_id": found.correlation_id,
        "at": now,
        "kind": str(EventKind.STUCK_DETECTED),
        "step_index": found.current_step,
        "step_name": mark.step_name,
        "phase": str(phase),
        "attempt": None,
        "actor": actor,
        "error": None,
        "traceback": None,
        "detail": mark.detail,
    }


def _cleared_event_row(row: Any, actor: str, now: int) -> dict[str, Any]:
    return {
        "saga_id": row.saga_id,
        "correlation_id": row.correlation_id,
        "at": now,
        "kind": str(EventKind.STUCK_CLEARED),
        "step_index": None,
        "step_name": None,
        "phase": None,
        "attempt": None,
        "actor": actor,
        "error": None,
        "traceback": None,
        "detail": {
            "flagged_at": row.since,
            "why": "it changed after it was flagged (a step began or ended, or someone acted)",
        },
    }


def _dead_letter_select() -> sa.Select[Any]:
    d = t.dead_letters.c
    return sa.select(d.id, d.saga_id, d.saga_name, d.created_at, d.auto_retries)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


T = TypeVar("T")


def retry_on_disconnect(work: Callable[[], T], attempts: int = 3) -> T:
    """Run ``work`` (one whole transaction) again when its connection was found dead.

    Pooled connections are not pinged on checkout (a round trip on the hot
    path); a connection PostgreSQL dropped fails its first statement, the
    pool invalidates it, and the transaction, which never committed, is
    simply run again on a fresh one.
    """
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except DBAPIError as exc:
            if not exc.connection_invalidated or attempt == attempts:
                raise
            log.warning("store connection lost (%s); retrying on a fresh one", exc.orig)
    raise AssertionError("unreachable")


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL whatever driver the URL names (or none)."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def open_store(url: str, *, pool_size: int = 10, echo: bool = False) -> Store:
    """A store for ``url`` (``sqlite:///file.db`` or ``postgresql://...``)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return SqliteStore(_sqlite_engine(url, echo))
    if url.startswith("postgresql"):
        # No pre-ping: it costs a round trip per checkout on the hot path. A
        # connection that died is invalidated by its first failing statement,
        # and the work is retried from the store.
        db = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, echo=echo)
        return PostgresStore(db)
    raise InvalidInput("SAGA_DATABASE_URL", f"{url!r} is neither sqlite:/// nor postgresql://")


def _sqlite_engine(url: str, echo: bool) -> SAEngine:
    db = sa.create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(db, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN IMMEDIATE
        # below is what starts every transaction.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(db, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front: a deferred transaction that later
        # upgrades to a write fails with "database is locked" instead of waiting.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return db


# -- row mapping ------------------------------------------------------------


def _batch_events(
    changes: Sequence[tuple[Instance, Transition]], actor: str
) -> list[dict[str, Any]]:
    return [
        _event_row(tr.instance, ev, actor, tr.instance.updated_at)
        for _, tr in changes
        for ev in tr.events
    ]


def _batch_conflict(
    changes: Sequence[tuple[Instance, Transition]], moved: int
) -> ConcurrencyConflict:
    first = changes[0][0]
    return ConcurrencyConflict(first.id, first.version, None, f"{moved} of a batch moved on")


def _instance_row(inst: Instance) -> dict[str, Any]:
    row = _instance_changes(inst)
    row.update(
        id=inst.id,
        saga_name=inst.saga_name,
        saga_version=inst.saga_version,
        step_count=len(inst.steps),
        payload=inst.payload,
        correlation_id=inst.correlation_id,
        business_key=inst.business_key,
        idempotency_key=inst.idempotency_key,
        version=inst.version,
        created_at=inst.created_at,
        lease_owner=inst.lease_owner,
        lease_expires_at=inst.lease_expires_at,
        kind=inst.kind,
    )
    return row


def _instance_changes(inst: Instance) -> dict[str, Any]:
    return {
        "state": str(inst.state),
        "current_step": inst.cursor,
        "updated_at": inst.updated_at,
        "last_progress_at": inst.last_progress_at,
        "next_run_at": inst.next_run_at,
    }


def _step_values(step: StepState) -> dict[str, Any]:
    values = {name: getattr(step, name) for name in _STEP_FIELDS}
    values["status"] = str(step.status)
    values["comp_status"] = str(step.comp_status)
    return values


def _step_row(saga_id: str, step: StepState) -> dict[str, Any]:
    return {"saga_id": saga_id, "step_index": step.index, **_step_values(step)}


def _event_row(inst: Instance, ev: Event, actor: str, now: int) -> dict[str, Any]:
    name = inst.steps[ev.step_index].name if ev.step_index is not None else None
    return {
        "saga_id": inst.id,
        "correlation_id": inst.correlation_id,
        "at": ev.at if ev.at is not None else now,
        "kind": str(ev.kind),
        "step_index": ev.step_index,
        "step_name": name,
        "phase": str(ev.phase) if ev.phase else None,
        "attempt": ev.attempt,
        "actor": actor,
        "error": ev.error,
        "traceback": ev.traceback,
        "detail": ev.detail,
    }


def _instance_from_rows(row: Any, step_rows: Sequence[Any]) -> Instance:
    steps = tuple(
        StepState(
            index=s["step_index"],
            **{name: s[name] for name in _STEP_FIELDS if name not in ("status", "comp_status")},
            status=StepStatus(s["status"]),
            comp_status=CompensationStatus(s["comp_status"]),
        )
        for s in step_rows
    )
    return Instance(
        id=row["id"],
        saga_name=row["saga_name"],
        saga_version=row["saga_version"],
        state=SagaState(row["state"]),
        cursor=row["current_step"],
        steps=steps,
        payload=row["payload"],
        correlation_id=row["correlation_id"],
        business_key=row["business_key"],
        idempotency_key=row["idempotency_key"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_progress_at=row["last_progress_at"],
        next_run_at=row["next_run_at"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        kind=row["kind"],
    )


def _replace(inst: Instance, **changes: Any) -> Instance:
    from dataclasses import replace

    return replace(inst, **changes)


def dumps(value: Any) -> str:
    """JSON text for values the store keeps; raises InvalidInput when not JSON."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("JSON value", str(exc)) from exc
    # PostgreSQL's JSONB cannot hold U+0000 (SQLite can): refuse it on every store.
    if "\\u0000" in text and has_nul(value):
        raise InvalidInput("JSON value", "text cannot contain the NUL character (U+0000)")
    return text


def has_nul(value: Any) -> bool:
    """True if a string anywhere in the JSON value ``value`` holds U+0000 (JSONB cannot)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(v) for v in value)
    return False
