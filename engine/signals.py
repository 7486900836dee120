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

An operator may send a signal too (the console's *Send signal*): then the
caller names the version it saw, and an audit entry (action ``signal``, with
the reason, the event and the data) is written in the same transaction.
:func:`open_waits` says, with the same rules, which events an instance can
still take a signal for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from engine.collaborators import Collaborators
from engine.decide import record_success, signal_problem, waiting_now
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, InvalidInput, InvalidTransition
from engine.inputs import check_id, check_text
from engine.model import Event, EventKind, Instance, Transition
from engine.operations import check_version
from engine.origins import IN_PROCESS, Origin
from engine.store import OperatorRecord, Store, dumps, retry_on_disconnect
from engine.transport.doorbells import ring

log = logging.getLogger(__name__)

_MAX_NAME = 200
#: Tries when a worker changes the instance between our read and our write.
_CONFLICT_ATTEMPTS = 5
_ALREADY_STORED = "a signal for that event is already stored; the waiting step takes that one"


@dataclass(frozen=True)
class Delivered:
    """What :func:`deliver` did with a signal."""

    instance: Instance
    #: True: the waiting step took it now. False: it is kept for the step, which has yet to wait.
    taken: bool


@dataclass(frozen=True)
class OpenWait:
    """A step that can still take a signal: it waits now, or has yet to begin waiting."""

    event: str
    step: str
    #: True: it waits now and takes a signal at once. False: a signal is kept until it waits.
    waiting: bool


def open_waits(collaborators: Collaborators, inst: Instance) -> list[OpenWait]:
    """The waits of ``inst`` that :func:`deliver` would give a signal to now, in step order."""
    c = collaborators
    defn = c.registry.get(inst.saga_name, inst.saga_version)
    now = c.clock()
    return [
        _open_wait(inst, event, index)
        for event, index in _waits(defn).items()
        if _problem(c.store, inst, event, index, now) is None
    ]


def open_wait(collaborators: Collaborators, inst: Instance, event: str) -> OpenWait:
    """The wait for ``event`` if a signal can be delivered to it now; a dry run of
    :func:`deliver`, which raises the :class:`InvalidTransition` it would raise."""
    c = collaborators
    defn = c.registry.get(inst.saga_name, inst.saga_version)
    index = _waiting_step(inst, defn, event)
    problem = _problem(c.store, inst, event, index, c.clock())
    if problem is not None:
        raise _refused(inst, event, problem)
    return _open_wait(inst, event, index)


def deliver(
    collaborators: Collaborators,
    saga_id: str,
    event: str,
    data: Any = None,
    *,
    sent_by: str = "api",
    operator: OperatorRecord | None = None,
    expected_version: int | None = None,
    origin: Origin = IN_PROCESS,
) -> Delivered:
    """Store the signal ``event`` for ``saga_id``; a waiting step takes it at once.

    ``operator`` (a person sent it) adds an audit entry in the same
    transaction; its detail gets the event, the data and whether the step
    took it. The timeline's event notes ``origin``, the door it came through,
    beside ``sent_by``, which is a claim. With ``expected_version``, an
    instance that changed since the caller read it raises
    :class:`ConcurrencyConflict`. Raises
    :class:`~engine.errors.SagaNotFound`, :class:`InvalidInput` (data that is
    not JSON, a bad name) or :class:`InvalidTransition` (see the module's
    docstring); nothing is written then.
    """
    dumps(data)
    check_id("saga id", saga_id)
    sent_by = _check_name("sender", sent_by)
    event = _check_name("event", event)
    signal = _Signal(event, data, sent_by, operator, expected_version, origin)
    # A caller that names the version it saw wants the conflict, not a decision
    # taken again on an instance it has not seen.
    attempts = 1 if expected_version is not None else _CONFLICT_ATTEMPTS
    delivered = _with_conflict_retries(
        lambda: retry_on_disconnect(lambda: _deliver_once(collaborators, saga_id, signal)),
        attempts,
    )
    inst = delivered.instance
    if delivered.taken and inst.state.is_active:
        ring(collaborators.transport, inst.id)
    return delivered


@dataclass(frozen=True)
class _Signal:
    """What :func:`deliver` was asked to deliver, checked."""

    event: str
    data: Any
    sent_by: str
    operator: OperatorRecord | None
    expected_version: int | None
    origin: Origin


def _with_conflict_retries(work: Callable[[], Delivered], attempts: int) -> Delivered:
    # A worker may change the instance between our read and our write (it
    # begins the wait, or finds it expired): read again and decide again.
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except ConcurrencyConflict:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _deliver_once(c: Collaborators, saga_id: str, signal: _Signal) -> Delivered:
    now = c.clock()
    event = signal.event
    with c.store.transaction() as conn:
        inst = c.store.load(saga_id, conn)
        check_version(inst, signal.expected_version)
        defn = c.registry.get(inst.saga_name, inst.saga_version)
        index = _waiting_step(inst, defn, event)
        problem = signal_problem(inst, index, now)
        if problem is not None:
            raise _refused(inst, event, problem)
        if not c.store.insert_signal(conn, inst.id, event, signal.data, signal.sent_by, now):
            raise _refused(inst, event, _ALREADY_STORED)
        taken = waiting_now(inst, index)
        noted = Event(
            EventKind.SIGNAL_RECEIVED,
            index,
            attempt=inst.steps[index].attempts or None,
            detail={
                "event": event,
                "sent_by": signal.sent_by,
                "origin": str(signal.origin),
                "taken": taken,
            },
            at=now,
        )
        actor = f"signal:{signal.sent_by}"
        audit = _audit_record(signal, taken)
        if not taken:
            c.store.append_events(inst, [noted], actor, now, conn=conn)
            if audit is not None:
                # Nothing changed but the kept signal: the entry names the step that takes it.
                name = inst.steps[index].name
                c.store.append_operator_note(inst, audit, now, conn, step_name=name)
            return Delivered(inst, taken=False)
        transition = Transition(inst, (noted,)).then(record_success(inst, defn, now, signal.data))
        saved = c.store.save(inst, transition, actor, conn=conn, operator=audit)
    return Delivered(saved, taken=True)


def _audit_record(signal: _Signal, taken: bool) -> OperatorRecord | None:
    if signal.operator is None:
        return None
    detail = {"event": signal.event, "data": signal.data, "taken": taken}
    return replace(signal.operator, detail={**(signal.operator.detail or {}), **detail})


def _waits(defn: Saga) -> dict[str, int]:
    """Each event the saga waits for, with the step that waits for it (one per event)."""
    return {step.signal: index for index, step in enumerate(defn.steps) if step.signal is not None}


def _waiting_step(inst: Instance, defn: Saga, event: str) -> int:
    waits = _waits(defn)
    if event in waits:
        return waits[event]
    named = f"it waits for {', '.join(map(repr, waits))}" if waits else "it waits for none"
    raise _refused(inst, event, f"no step of saga {defn.name!r} waits for that event ({named})")


def _problem(store: Store, inst: Instance, event: str, index: int, now: int) -> str | None:
    problem = signal_problem(inst, index, now)
    if problem is None and store.stored_signal(inst.id, event) is not None:
        return _ALREADY_STORED
    return problem


def _open_wait(inst: Instance, event: str, index: int) -> OpenWait:
    return OpenWait(event, inst.steps[index].name, waiting_now(inst, index))


def _refused(inst: Instance, event: str, why: str) -> InvalidTransition:
    return InvalidTransition(inst.id, f"deliver the {event!r} signal to", inst.state, why)


def _check_name(field: str, value: str) -> str:
    text = (value or "").strip() if isinstance(value, str) else ""
    if not text or len(text) > _MAX_NAME:
        raise InvalidInput(field, f"must be 1 to {_MAX_NAME} characters")
    return check_text(field, text, limit=_MAX_NAME)
