"""Signals: external events (an approval, a webhook) that a waiting step takes as its outcome.

A step added with ``saga.wait_for("manager_approval", timeout=...)`` waits
for a signal of that name. :func:`deliver` (``engine.signal(...)``, ``saga
signal ID EVENT``) stores the signal first, one row per instance and event
in ``saga_signals``, and in the same transaction:

- when the step is waiting now, records the signal's data as its output and
  moves the saga on (version-checked, like an operator's action); after the
  commit a doorbell wakes a worker for whatever is due next;
- when the step has not begun yet, keeps the signal for it: the step takes
  it as soon as it begins. A webhook may well beat the saga to its wait, so an
  early signal is kept rather than refused.

A signal is refused, with :class:`~engine.errors.InvalidTransition` and
nothing written, when no step of the saga waits for that event, when that
step already ended or its wait passed its deadline, when a signal for it is
already stored, or when the saga is compensating, dead-lettered or finished.
If the deadline passes before any signal, the step times out and the saga
follows the step's retry policy (no second wait by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from engine import schema as t
from engine.decide import record_success, signal_problem, waiting_now
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, InvalidInput, InvalidTransition
from engine.model import Event, EventKind, Instance, Transition
from engine.store import Store, dumps, retry_on_disconnect
from engine.transport import ring

if TYPE_CHECKING:
    from engine.app import SagaEngine

log = logging.getLogger(__name__)

_MAX_NAME = 200


@dataclass(frozen=True)
class StoredSignal:
    """A signal as stored: its data, when it came and who sent it."""

    event: str
    data: Any
    received_at: int
    sent_by: str


@dataclass(frozen=True)
class Delivered:
    """What :func:`deliver` did with a signal."""

    instance: Instance
    #: True: the waiting step took it now. False: it is kept for the step, which has yet to wait.
    taken: bool


def stored_signal(store: Store, saga_id: str, event: str) -> StoredSignal | None:
    """The signal stored for ``event`` on ``saga_id``, if one came."""
    s = t.signals.c
    query = sa.select(s.data, s.received_at, s.sent_by).where(
        s.saga_id == saga_id, s.event == event
    )
    with store.db.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    return StoredSignal(event, row.data, row.received_at, row.sent_by)


def deliver(
    engine: SagaEngine, saga_id: str, event: str, data: Any = None, *, sent_by: str = "api"
) -> Delivered:
    """Store the signal ``event`` for ``saga_id``; a waiting step takes it at once.

    Raises :class:`~engine.errors.SagaNotFound`, :class:`InvalidInput` (data
    that is not JSON, a bad name) or :class:`InvalidTransition` (see the
    module's docstring); nothing is written then.
    """
    dumps(data)
    sent_by = _check_name("sender", sent_by)
    event = _check_name("event", event)
    delivered = _with_conflict_retries(
        lambda: retry_on_disconnect(lambda: _deliver_once(engine, saga_id, event, data, sent_by))
    )
    inst = delivered.instance
    if delivered.taken and inst.state.is_active:
        ring(engine.transport, inst.id)
    return delivered


def _with_conflict_retries(work: Callable[[], Delivered], attempts: int = 5) -> Delivered:
    # A worker may change the instance between our read and our write (it
    # begins the wait, or finds it expired): read again and decide again.
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except ConcurrencyConflict:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _deliver_once(
    engine: SagaEngine, saga_id: str, event: str, data: Any, sent_by: str
) -> Delivered:
    now = engine.clock()
    with engine.store.transaction() as conn:
        inst = engine.store.load(saga_id, conn)
        defn = engine.registry.get(inst.saga_name, inst.saga_version)
        index = _waiting_step(inst, defn, event)
        problem = signal_problem(inst, index, now)
        if problem is not None:
            raise InvalidTransition(
                saga_id, f"deliver the {event!r} signal to", inst.state, problem
            )
        _insert(conn, inst, event, data, sent_by, now)
        taken = waiting_now(inst, index)
        noted = Event(
            EventKind.SIGNAL_RECEIVED,
            index,
            attempt=inst.steps[index].attempts or None,
            detail={"event": event, "sent_by": sent_by, "taken": taken},
            at=now,
        )
        actor = f"signal:{sent_by}"
        if not taken:
            engine.store.append_events(inst, [noted], actor, now, conn=conn)
            return Delivered(inst, taken=False)
        transition = Transition(inst, (noted,)).then(record_success(inst, defn, now, data))
        saved = engine.store.save(inst, transition, actor, conn=conn)
    return Delivered(saved, taken=True)


def _waiting_step(inst: Instance, defn: Saga, event: str) -> int:
    for index, step in enumerate(defn.steps):
        if step.signal == event:
            return index
    events = [s.signal for s in defn.steps if s.signal is not None]
    waits = f"it waits for {', '.join(map(repr, events))}" if events else "it waits for none"
    raise InvalidTransition(
        inst.id,
        f"deliver the {event!r} signal to",
        inst.state,
        f"no step of saga {defn.name!r} waits for that event ({waits})",
    )


def _insert(
    conn: Connection, inst: Instance, event: str, data: Any, sent_by: str, now: int
) -> None:
    try:
        with conn.begin_nested():
            conn.execute(
                t.signals.insert().values(
                    saga_id=inst.id, event=event, data=data, received_at=now, sent_by=sent_by
                )
            )
    except IntegrityError:
        raise InvalidTransition(
            inst.id,
            f"deliver the {event!r} signal to",
            inst.state,
            "a signal for that event is already stored; the waiting step takes that one",
        ) from None


def _check_name(field: str, value: str) -> str:
    text = (value or "").strip() if isinstance(value, str) else ""
    if not text or len(text) > _MAX_NAME:
        raise InvalidInput(field, f"must be 1 to {_MAX_NAME} characters")
    return text
