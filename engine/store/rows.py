"""Instances as rows and rows as instances, and the JSON the store keeps.

Pure functions: no statement runs here. The store's modules build their
parameters with them, and read instances back through :func:`instance_from_rows`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from engine.errors import ConcurrencyConflict, InvalidInput
from engine.model import Event, Instance, StepState, Transition
from engine.states import CompensationStatus, SagaState, StepStatus

#: The columns of ``saga_steps`` that a transition may change, named as on StepState.
STEP_FIELDS = [f.name for f in fields(StepState) if f.name != "index"]
#: The columns of ``saga_instances`` that a transition may change.
INSTANCE_FIELDS = ["state", "current_step", "updated_at", "last_progress_at", "next_run_at"]

Change = tuple[Instance, Transition]


def instance_row(inst: Instance) -> dict[str, Any]:
    """Every column of ``inst``'s row in ``saga_instances``."""
    row = instance_changes(inst)
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


def instance_changes(inst: Instance) -> dict[str, Any]:
    """The columns of :data:`INSTANCE_FIELDS`, as ``inst`` has them."""
    return {
        "state": str(inst.state),
        "current_step": inst.cursor,
        "updated_at": inst.updated_at,
        "last_progress_at": inst.last_progress_at,
        "next_run_at": inst.next_run_at,
    }


def step_values(step: StepState) -> dict[str, Any]:
    """The columns of :data:`STEP_FIELDS`, as ``step`` has them."""
    values = {name: getattr(step, name) for name in STEP_FIELDS}
    values["status"] = str(step.status)
    values["comp_status"] = str(step.comp_status)
    return values


def step_row(saga_id: str, step: StepState) -> dict[str, Any]:
    """Every column of ``step``'s row in ``saga_steps``."""
    return {"saga_id": saga_id, "step_index": step.index, **step_values(step)}


def event_row(inst: Instance, ev: Event, actor: str, now: int) -> dict[str, Any]:
    """The ``saga_events`` row of ``ev`` on ``inst``; an event without a time is at ``now``."""
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


def batch_events(changes: Sequence[Change], actor: str) -> list[dict[str, Any]]:
    """The event rows of a batch of changes, in their order."""
    return [
        event_row(tr.instance, ev, actor, tr.instance.updated_at)
        for _, tr in changes
        for ev in tr.events
    ]


def batch_conflict(changes: Sequence[Change], moved: int) -> ConcurrencyConflict:
    """The conflict of a batch in which ``moved`` instances had moved on."""
    first = changes[0][0]
    return ConcurrencyConflict(first.id, first.version, None, f"{moved} of a batch moved on")


def instance_from_rows(row: Any, step_rows: Sequence[Any]) -> Instance:
    """The instance of a ``saga_instances`` row and its ``saga_steps`` rows (in order)."""
    steps = tuple(
        StepState(
            index=s["step_index"],
            **{name: s[name] for name in STEP_FIELDS if name not in ("status", "comp_status")},
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


# -- the JSON the store keeps ------------------------------------------------------


def dumps(value: Any) -> str:
    """JSON text for values the store keeps; raises InvalidInput when not JSON."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("JSON value", str(exc)) from exc
    # PostgreSQL's JSONB cannot hold U+0000 (SQLite can): refuse it on every store.
    if "\\u0000" in text and has_nul(value):
        raise InvalidInput("JSON value", "text cannot contain the NUL character (U+0000)")
    # Nor a lone surrogate (JSON escapes it as \\udXXX; no store can keep one).
    if "\\ud" in text and _has_lone_surrogate(value):
        raise InvalidInput("JSON value", "text cannot contain a lone surrogate (not Unicode)")
    return text


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def has_nul(value: Any) -> bool:
    """True if a string anywhere in the JSON value ``value`` holds U+0000 (JSONB cannot)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(v) for v in value)
    return False


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text, for statements that take JSON parameters."""
    return json.dumps(value, separators=(",", ":"))
