"""The operations API: what an operator can do, for the CLI and the console alike.

Every action takes an actor and a reason, refuses an id, actor or reason the
store could not keep (:mod:`engine.inputs`) before anything is read, checks
the version the caller saw, applies the pure rule from
:mod:`engine.interventions`, and stores the transition with its audit record
in one transaction. The actor is a claim; the audit record keeps beside it the
action's origin, the door it came through (:mod:`engine.origins`), which each
door names: the CLI, the console, the sweeper. A caller in-process that names
none is recorded as ``engine``. Reads for listing and
showing instances live in :mod:`engine.queries`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine import interventions
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, InvalidInput
from engine.inputs import MAX_REASON, check_id, check_text
from engine.interventions import AUDIT_ACTIONS, Action
from engine.model import Instance, Transition
from engine.origins import IN_PROCESS, Origin, OriginKind
from engine.registry import Registry
from engine.store import OperatorRecord, Store, dumps, retry_on_disconnect
from engine.transport.doorbells import Transport, ring

#: The longest name of who acts, in the audit log and on the timeline.
MAX_ACTOR = 150


class Operations:
    """Operator actions on saga instances."""

    def __init__(
        self, store: Store, registry: Registry, transport: Transport, clock: Callable[[], int]
    ) -> None:
        self.store = store
        self.registry = registry
        self.transport = transport
        self.clock = clock

    def retry(
        self,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Run the failed or waiting step (or compensation) now, with a fresh retry budget."""
        return self.act(
            Action.RETRY,
            saga_id,
            actor=actor,
            reason=reason,
            expected_version=expected_version,
            origin=origin,
        )

    def skip(
        self,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Mark the current step (or its compensation) done by hand and go on."""
        return self.act(
            Action.SKIP,
            saga_id,
            actor=actor,
            reason=reason,
            expected_version=expected_version,
            origin=origin,
        )

    def compensate(
        self,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Stop going forward and compensate every started step, from the current one."""
        return self.act(
            Action.COMPENSATE,
            saga_id,
            actor=actor,
            reason=reason,
            expected_version=expected_version,
            origin=origin,
        )

    def cancel(
        self,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Stop the instance where it stands; nothing more runs and nothing is undone."""
        return self.act(
            Action.CANCEL,
            saga_id,
            actor=actor,
            reason=reason,
            expected_version=expected_version,
            origin=origin,
        )

    def act(
        self,
        action: Action,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        detail: dict[str, Any] | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Apply ``action`` if the state allows it and nobody changed the instance since.

        ``detail`` goes in the audit record (a bulk operation names itself
        there), and so does ``origin``, the door the action came through.
        """
        record = OperatorRecord(
            check_actor(actor), str(action), check_reason(reason), detail, origin=origin
        )
        return self._change(
            saga_id,
            expected_version,
            lambda inst, defn, now: interventions.apply(action, inst, defn, now),
            lambda inst: record,
        )

    def edit_and_retry(
        self,
        saga_id: str,
        payload: Any,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Replace the payload every step reads, then retry the failed step now.

        The audit record keeps the payload before and after the edit.
        """
        actor, reason = check_actor(actor), check_reason(reason)
        dumps(payload)  # InvalidInput, before anything is read, when it is not JSON
        return self._change(
            saga_id,
            expected_version,
            lambda inst, defn, now: interventions.edit_and_retry(inst, defn, now, payload),
            lambda inst: OperatorRecord(
                actor,
                interventions.EDIT_RETRY,
                reason,
                {"payload_before": inst.payload, "payload_after": payload},
                origin=origin,
            ),
        )

    def resolve(
        self,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Instance:
        """Close a dead letter dealt with by hand: the saga ends cancelled, nothing is undone."""
        record = OperatorRecord(
            check_actor(actor), interventions.RESOLVE, check_reason(reason), origin=origin
        )
        return self._change(
            saga_id, expected_version, interventions.resolve_by_hand, lambda inst: record
        )

    def note_not_applied(
        self,
        saga_id: str,
        *,
        actor: str,
        reason: str,
        detail: dict[str, Any],
        origin: Origin = IN_PROCESS,
    ) -> None:
        """Record in the audit log that an action was not applied to an instance (a bulk
        operation's item that had changed, was refused or failed); nothing else changes."""
        record = OperatorRecord(
            check_actor(actor),
            interventions.BULK_NOT_APPLIED,
            check_reason(reason),
            detail,
            origin=origin,
        )
        check_id("saga id", saga_id)
        retry_on_disconnect(
            lambda: self.store.append_operator_note(self.store.load(saga_id), record, self.clock())
        )

    def _change(
        self,
        saga_id: str,
        expected_version: int | None,
        rule: Callable[[Instance, Saga, int], Transition],
        record: Callable[[Instance], OperatorRecord],
    ) -> Instance:
        check_id("saga id", saga_id)
        saved = retry_on_disconnect(
            lambda: self._change_once(saga_id, expected_version, rule, record)
        )
        if saved.state.is_active:
            ring(self.transport, saved.id)
        return saved

    def _change_once(
        self,
        saga_id: str,
        expected_version: int | None,
        rule: Callable[[Instance, Saga, int], Transition],
        record: Callable[[Instance], OperatorRecord],
    ) -> Instance:
        with self.store.transaction() as conn:
            inst = self.store.load(saga_id, conn)
            check_version(inst, expected_version)
            defn = self.registry.get(inst.saga_name, inst.saga_version)
            transition = rule(inst, defn, self.clock())
            audit = record(inst)
            saved = self.store.save(
                inst, transition, f"operator:{audit.actor}", conn=conn, operator=audit
            )
            if saved.payload != inst.payload:
                self.store.set_payload(saved.id, saved.payload, conn)
        return saved

    def allowed(self, inst: Instance) -> list[Action]:
        """The actions the instance's state allows now."""
        defn = self.registry.get(inst.saga_name, inst.saga_version)
        return interventions.allowed_actions(inst, defn, self.clock())


def check_version(inst: Instance, expected: int | None) -> None:
    """Raise ConcurrencyConflict if ``inst`` is no longer at the version the caller saw
    (``expected``; None: the caller did not say)."""
    if expected is not None and inst.version != expected:
        raise ConcurrencyConflict(
            inst.id, expected, inst.version, f"it is {inst.state} at step {inst.current.name!r}"
        )


def check_reason(reason: str) -> str:
    """The reason an operator gave, trimmed; InvalidInput when empty, too long or unstorable."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("reason", "say why you are doing this; it goes in the audit log")
    return check_text("reason", reason, limit=MAX_REASON)


def check_actor(actor: str) -> str:
    """Who acts, trimmed; InvalidInput unless 1 to 150 storable characters."""
    if not isinstance(actor, str) or not actor.strip() or len(actor.strip()) > MAX_ACTOR:
        raise InvalidInput("actor", f"name who is acting (1 to {MAX_ACTOR} characters)")
    return check_text("actor", actor, limit=MAX_ACTOR)


def check_json(value: Any) -> None:
    """InvalidInput unless the store can keep ``value`` as JSON (not NaN, no NUL character),
    so that a form can refuse what was typed before any operation sees it."""
    dumps(value)


# The door's names, with the actions' vocabulary (from engine.interventions) and
# their origins' (engine.origins) that callers of the operations name: the console
# and the CLI import them from here.
__all__ = [
    "AUDIT_ACTIONS",
    "IN_PROCESS",
    "MAX_ACTOR",
    "MAX_REASON",
    "Action",
    "Operations",
    "Origin",
    "OriginKind",
    "check_actor",
    "check_json",
    "check_reason",
    "check_version",
]
