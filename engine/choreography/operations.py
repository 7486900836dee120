"""Operator actions on choreographed instances: force-compensate and re-publish, audited."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from engine.choreography.declaration import Choreography
from engine.choreography.handlers import EventBus
from engine.choreography.track import compensation_plan
from engine.errors import InvalidInput, InvalidTransition
from engine.idempotency import IdempotencyGuard
from engine.interventions import FORCE_COMPENSATE, REPUBLISH
from engine.model import now_ms
from engine.origins import IN_PROCESS, Origin
from engine.queries import Queries
from engine.store import OperatorRecord, Store

log = logging.getLogger(__name__)


# -- operator actions on choreographed instances -----------------------------


class ChoreographyOperations:
    """Force-compensate and nudge choreographed instances; each action is audited.

    A forced compensation publishes, for each step that completed and is not
    undone, latest first, the compensating event that step would have
    published, with ``forced: true`` in its data: the step's own service
    reacts to it by undoing its work (see the example), and the tracker moves
    the instance to compensated. Each event goes out once per step, however
    often the action is repeated (a guard key per step); re-publishing the last
    event sends it again with the same id, so services that handled it already
    absorb it and one that missed it acts.
    """

    def __init__(self, store: Store, bus: EventBus, choreographies: Sequence[Choreography]):
        self.store = store
        self.bus = bus
        self.by_name = {c.name: c for c in choreographies}
        self._guard = IdempotencyGuard(store.db, "force-compensate")

    def force_compensate(
        self, saga_id: str, *, actor: str, reason: str, origin: Origin = IN_PROCESS
    ) -> list[str]:
        """Publish the compensating events still to go; returns those published now.

        The audit entry keeps ``origin``, the door the action came through.
        """
        inst, decl = self._choreographed(saga_id, "force-compensate", reason)
        published: list[str] = []
        data = {**(inst.payload or {}), "forced": True, "forced_by": actor, "reason": reason}
        for order in compensation_plan(decl, inst):
            if self._guard.seen(order.key):
                continue

            def publish(
                _conn: Any, event_type: str = order.event_type, key: str = order.key
            ) -> str:
                return self.bus.publish(
                    event_type,
                    data,
                    correlation_id=inst.correlation_id,
                    event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
                )

            self._guard.run_once(order.key, publish)
            published.append(order.event_type)
        record = OperatorRecord(
            actor, FORCE_COMPENSATE, reason, {"published": published}, origin=origin
        )
        self.store.append_operator_note(inst, record, now_ms())
        return published

    def republish_last(
        self, saga_id: str, *, actor: str, reason: str, origin: Origin = IN_PROCESS
    ) -> str:
        """Publish the last event the instance moved on again, same id and data; its type.

        The audit entry keeps ``origin``, the door the action came through.
        """
        inst, _ = self._choreographed(saga_id, "re-publish", reason)
        last = None
        for record in Queries(self.store).timeline(saga_id):
            detail = record.detail or {}
            moved = record.kind == "saga_started" or (
                record.kind == "attempt_succeeded" and record.phase == "action"
            )
            if moved and detail.get("event_id"):
                last = record
        if last is None or last.detail is None:
            raise InvalidTransition(
                saga_id, "re-publish", str(inst.state), "no event to re-publish"
            )
        if last.kind == "saga_started":
            data = inst.payload or {}
        else:
            data = inst.steps[last.step_index or 0].output or {}
        event_type = str(last.detail["event"])
        self.bus.publish(
            event_type,
            data,
            correlation_id=inst.correlation_id,
            event_id=str(last.detail["event_id"]),
        )
        detail = {"event": event_type, "event_id": last.detail["event_id"]}
        self.store.append_operator_note(
            inst, OperatorRecord(actor, REPUBLISH, reason, detail, origin=origin), now_ms()
        )
        return event_type

    def _choreographed(self, saga_id: str, action: str, reason: str) -> tuple[Any, Choreography]:
        if not reason or not reason.strip():
            raise InvalidInput("reason", "say why: it goes into the audit log")
        inst = self.store.load(saga_id)
        decl = self.by_name.get(inst.saga_name)
        if inst.kind != "choreographed" or decl is None:
            raise InvalidTransition(saga_id, action, str(inst.state), "not a declared choreography")
        if inst.state.is_final:
            raise InvalidTransition(saga_id, action, str(inst.state), "it has finished")
        return inst, decl
