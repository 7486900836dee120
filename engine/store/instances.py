"""The store of saga instances: :class:`Store`, their lifecycle in SQL.

Every state change goes through :meth:`Store.save`: one transaction holding
the instance row (version-checked), the step rows that changed, the timeline
events and any dead letter or audit entry. Creating, loading, leasing and
settling an instance are here too; the append-only records beside it are
written by :mod:`engine.store.timeline` inside the same transactions.

The store is composed of the parts that ask it other questions: the sweeps'
queries (``store.sweeps``, :mod:`engine.store.sweeps`) and the read side's
(``store.reads``, :mod:`engine.store.reads`). Backend quirks live in the
subclasses of :mod:`engine.store.backends`.

Each stored transition is told to ``on_transition`` (the metrics, by
default: see :func:`~engine.store.backends.open_store`) once its transaction
committed, and never when it rolled back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import Engine

from engine.errors import ConcurrencyConflict, SagaNotFound
from engine.model import Event, Instance, Transition, evolve, now_ms
from engine.store import commits, leases
from engine.store import schema as t
from engine.store import timeline as tl
from engine.store.commits import TransitionHook
from engine.store.reads import LiveCounts, Reads
from engine.store.rows import (
    INSTANCE_FIELDS,
    STEP_FIELDS,
    Change,
    batch_conflict,
    batch_events,
    instance_changes,
    instance_from_rows,
    instance_row,
    step_row,
    step_values,
)
from engine.store.sweeps import SweepQueries
from engine.store.timeline import OperatorRecord, StoredSignal


def _build_save_statement(with_owner: bool, release: bool) -> sa.Update:
    # Built once: constructing statements per call costs more CPU than running them.
    i = t.instances.c
    cond = [i.id == sa.bindparam("b_id"), i.version == sa.bindparam("b_version")]
    if with_owner:
        cond.append(i.lease_owner == sa.bindparam("b_owner"))
    values: dict[str, Any] = {name: sa.bindparam(name) for name in INSTANCE_FIELDS}
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
    .values({name: sa.bindparam(name) for name in STEP_FIELDS})
)


class Store:
    """Saga instances, their steps, timeline, dead letters and audit log, in SQL."""

    dialect = "generic"

    def __init__(
        self, db: Engine, *, on_transition: TransitionHook = commits.ignore_transitions
    ) -> None:
        self.db = db
        self.on_transition = on_transition
        #: The sweeps' questions and marks.
        self.sweeps = SweepQueries(db, self._lock_claimable)
        #: The read side's questions (through :class:`engine.queries.Queries`).
        self.reads = Reads(db)

    # -- transactions -------------------------------------------------------

    def transaction(self) -> AbstractContextManager[Connection]:
        """One database transaction; commits on success, rolls back on error. What it
        stored is told to ``on_transition`` after the commit."""
        return commits.transaction(self.db)

    def savepoint(self, conn: Connection) -> AbstractContextManager[None]:
        """A savepoint in ``conn``'s transaction: an error inside undoes what was written
        since, and goes on up (a transactional step's attempt, contained)."""
        return commits.savepoint(conn)

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
        self._stored(conn, None, inst, transition.events)
        return inst, True

    def _insert_new(self, c: Connection, transition: Transition, actor: str) -> bool:
        """Insert instance, steps and events; False if the idempotency key is taken."""
        inst = transition.instance
        if not self._insert_instance(c, instance_row(inst)):
            return False
        c.execute(t.steps.insert(), [step_row(inst.id, s) for s in inst.steps])
        tl.append_events(c, inst, transition.events, actor, inst.created_at)
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
            params = instance_changes(new)
            params.update(b_id=old.id, b_version=old.version, b_owner=owner)
            done = c.execute(_SAVE[owner is not None, release], params).rowcount
            if done != 1:
                raise self._conflict(c, old, owner)
            self._update_steps(c, old, new)
            tl.append_events(c, new, transition.events, actor, now)
            if transition.dead_letter is not None:
                tl.insert_dead_letter(c, new, transition, now)
            if transition.resolves_dead_letter:
                tl.resolve_dead_letters(c, new.id, actor, operator, now)
            if operator is not None:
                tl.insert_operator_action(c, old, operator, now, after=(new.state, old.version + 1))
        self._stored(conn, old, new, transition.events)
        lease: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None} if release else {}
        return evolve(new, version=old.version + 1, **lease)

    def save_many(self, changes: Sequence[Change], actor: str, conn: Connection) -> list[Instance]:
        """:meth:`save` for many instances in one go (no lease check), so that a batch
        costs a few round trips, not a few per instance.

        Raises ConcurrencyConflict, without saying which, if any of them moved
        on: the caller's transaction must then be rolled back as a whole.
        Changes to one instance may follow each other, each on the last.
        """
        if not changes:
            return []
        self._save_batch(conn, changes, actor)
        for _, tr in changes:
            if tr.dead_letter is not None:
                tl.insert_dead_letter(conn, tr.instance, tr, tr.instance.updated_at)
        commits.after_commit(conn, partial(self._stored_all, changes))
        return [evolve(tr.instance, version=old.version + 1) for old, tr in changes]

    def _save_batch(self, conn: Connection, changes: Sequence[Change], actor: str) -> None:
        # One executemany each for the instances, their steps and their events.
        params = []
        for old, transition in changes:
            row = instance_changes(transition.instance)
            row.update(b_id=old.id, b_version=old.version, b_owner=None)
            params.append(row)
        done = conn.execute(_SAVE[False, False], params).rowcount
        if done != len(params):
            raise batch_conflict(changes, len(params) - done)
        steps = [
            {"b_saga_id": new.id, "b_index": st.index, **step_values(st)}
            for old, tr in changes
            for new in (tr.instance,)
            for st, before in zip(new.steps, old.steps, strict=True)
            if st != before
        ]
        if steps:
            conn.execute(_UPDATE_STEP, steps)
        events = batch_events(changes, actor)
        if events:
            conn.execute(t.events.insert(), events)

    def set_payload(self, saga_id: str, payload: Any, conn: Connection) -> None:
        """Replace an instance's payload, inside the transaction that saved an operator's
        edit (:meth:`save` never writes the payload: it does not change as a saga runs)."""
        c = t.instances.c
        conn.execute(t.instances.update().where(c.id == saga_id).values(payload=payload))

    def _stored(
        self, conn: Connection | None, old: Instance | None, new: Instance, events: Sequence[Event]
    ) -> None:
        # Without ``conn`` the method's own transaction committed already; with one,
        # the caller's transaction has yet to.
        if conn is None:
            self.on_transition(old, new, events)
        else:
            commits.after_commit(conn, partial(self.on_transition, old, new, events))

    def _stored_all(self, changes: Sequence[Change]) -> None:
        for old, tr in changes:
            self.on_transition(old, tr.instance, tr.events)

    # -- the records beside an instance ------------------------------------------

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
            after = (inst.state, inst.version)
            tl.insert_operator_action(c, inst, op, now, after=after, step_name=step_name)

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
            tl.append_events(c, inst, events, actor, now)

    def insert_signal(
        self, conn: Connection, saga_id: str, event: str, data: Any, sent_by: str, now: int
    ) -> bool:
        """Store a signal in ``conn``'s transaction; False when one for ``event`` is there."""
        return tl.insert_signal(conn, saga_id, event, data, sent_by, now)

    def stored_signal(self, saga_id: str, event: str) -> StoredSignal | None:
        """The signal stored for ``event`` on ``saga_id``, if one came."""
        with self.db.connect() as c:
            return tl.stored_signal(c, saga_id, event)

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
        with self.db.begin() as c:
            tl.insert_event_dead_letter(
                c,
                now_ms(),
                handler=handler,
                event_id=event_id,
                event_type=event_type,
                correlation_id=correlation_id,
                reason=reason,
                attempts=attempts,
                fields=fields,
            )

    def event_dead_letters(self, limit: int = 200) -> list[dict[str, Any]]:
        """Dead-lettered domain events, newest first."""
        with self.db.connect() as c:
            return tl.event_dead_letters(c, limit)

    def live_counts(self) -> LiveCounts:
        """The metrics' gauges: open instances by saga and state (stuck among them), and
        open dead letters by saga with the oldest; read from partial indexes only."""
        return self.reads.live_counts()

    # -- leases -------------------------------------------------------------

    def claim(self, saga_id: str, owner: str, ttl_ms: int, now: int) -> Instance | None:
        """Take the lease on one active instance if nobody holds it; None if taken or idle."""
        with self.db.begin() as c:
            return self._load(c, saga_id) if leases.claim(c, saga_id, owner, ttl_ms, now) else None

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
        with self.db.begin() as c:
            query = self._lock_claimable(leases.claimable(now, limit, sagas))
            ids = list(c.execute(query).scalars())
            if ids:
                leases.lease(c, ids, owner, ttl_ms, now)
            return ids

    def renew(self, owner: str, saga_ids: Sequence[str], ttl_ms: int, now: int) -> int:
        """Extend the leases ``owner`` still holds (the heartbeat); returns how many."""
        if not saga_ids:
            return 0
        with self.db.begin() as c:
            return leases.renew(c, owner, saga_ids, ttl_ms, now)

    def release(self, saga_id: str, owner: str) -> None:
        with self.db.begin() as c:
            leases.release(c, saga_id, owner)

    def clear_expired_lease(self, saga_id: str, now: int) -> bool:
        """Drop a lease that expired (whoever held it); False if it was renewed or taken."""
        with self.db.begin() as c:
            return leases.clear_expired(c, saga_id, now)

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
        with self.transaction() as c:
            found = self._lock_claimable(leases.free(saga_id, now))
            if c.execute(found).first() is None:
                return None
            inst = self._load(c, saga_id)
            transition = settle(inst)
            if not transition.events:
                return None
            return self.save(inst, transition, actor, release=True, conn=c)

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
        return {i: instance_from_rows(row, step_rows[i]) for i, row in found.items()}

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
        return instance_from_rows(row, step_rows)

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

    def _lock_claimable(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """``query``, locking the rows it picks where the backend can skip rows others hold."""
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
            {"b_saga_id": new.id, "b_index": s.index, **step_values(s)}
            for s, before in zip(new.steps, old.steps, strict=True)
            if s != before
        ]
        if changed:  # one executemany: psycopg pipelines the rows in one round trip
            c.execute(_UPDATE_STEP, changed)
