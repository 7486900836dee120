"""The append-only records beside an instance: its timeline, its dead letters, the audit
log, the signals it received, and the domain events a handler gave up on.

Each function runs on the connection of a transaction it is given, so that
the store composes them into the one transaction of a transition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from engine.model import Event, Instance, Transition
from engine.origins import Origin
from engine.states import SagaState
from engine.store import schema as t
from engine.store.rows import event_row


@dataclass(frozen=True)
class OperatorRecord:
    """An operator action to append to the audit log with its transition.

    ``actor`` is who the caller says acts; ``origin`` is the door it came
    through, which every caller must name (:mod:`engine.origins`).
    """

    actor: str
    action: str
    reason: str
    detail: dict[str, Any] | None = None
    origin: Origin = field(kw_only=True)


@dataclass(frozen=True)
class StoredSignal:
    """A signal as stored: its data, when it came and who sent it."""

    event: str
    data: Any
    received_at: int
    sent_by: str


def append_events(
    c: Connection, inst: Instance, evs: Sequence[Event], actor: str, now: int
) -> None:
    """Append ``evs`` to ``inst``'s timeline; an event without a time is at ``now``."""
    if evs:
        c.execute(t.events.insert(), [event_row(inst, e, actor, now) for e in evs])


def insert_dead_letter(c: Connection, inst: Instance, tr: Transition, now: int) -> None:
    """Record the dead letter of ``tr`` (which has one) on ``inst``."""
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


def resolve_dead_letters(
    c: Connection, saga_id: str, actor: str, operator: OperatorRecord | None, now: int
) -> None:
    """Close the open dead letters of an instance, by ``actor`` (with the operator's action)."""
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


def insert_operator_action(
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
            origin=str(op.origin.kind),
            origin_detail=op.origin.detail,
        )
    )


# -- signals -------------------------------------------------------------------------


def insert_signal(
    c: Connection, saga_id: str, event: str, data: Any, sent_by: str, now: int
) -> bool:
    """Store a signal in ``c``'s transaction; False when one for ``event`` is there."""
    row = {"event": event, "data": data, "sent_by": sent_by}
    try:
        with c.begin_nested():
            c.execute(t.signals.insert().values(saga_id=saga_id, received_at=now, **row))
    except sa.exc.IntegrityError:
        return False
    return True


def stored_signal(c: Connection, saga_id: str, event: str) -> StoredSignal | None:
    """The signal stored for ``event`` on ``saga_id``, if one came."""
    s = t.signals.c
    query = sa.select(s.data, s.received_at, s.sent_by).where(
        s.saga_id == saga_id, s.event == event
    )
    row = c.execute(query).first()
    if row is None:
        return None
    return StoredSignal(event, row.data, row.received_at, row.sent_by)


# -- domain events a handler gave up on (choreography) ----------------------------------


def insert_event_dead_letter(
    c: Connection,
    now: int,
    *,
    handler: str,
    event_id: str | None,
    event_type: str | None,
    correlation_id: str | None,
    reason: str,
    attempts: int,
    fields: dict[str, str] | None,
) -> None:
    """Record a domain event ``handler`` gave up on, or could not read."""
    c.execute(
        t.event_dead_letters.insert().values(
            at=now,
            handler=handler[:200],
            event_id=event_id[:200] if event_id else None,
            event_type=event_type[:200] if event_type else None,
            correlation_id=correlation_id[:200] if correlation_id else None,
            reason=reason,
            attempts=attempts,
            fields=fields,
        )
    )


def event_dead_letters(c: Connection, limit: int) -> list[dict[str, Any]]:
    """Dead-lettered domain events, newest first."""
    d = t.event_dead_letters.c
    rows = c.execute(sa.select(t.event_dead_letters).order_by(d.id.desc()).limit(limit))
    return [dict(r) for r in rows.mappings()]
