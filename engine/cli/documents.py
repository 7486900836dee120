"""The ``--json`` documents about instances (docs/cli.md; ``schema_version`` 1).

Within a schema version keys are only added, never renamed, removed or
retyped: scripts read these documents, so change them with care.
"""

from __future__ import annotations

from typing import Any

from engine.cli.context import Cli
from engine.definition import Saga
from engine.errors import UnknownSaga
from engine.interventions import allowed_actions
from engine.model import Instance, StepState, idempotency_key, now_ms
from engine.queries import Queries
from engine.states import Phase


def describe(cli: Cli, saga_id: str) -> dict[str, Any]:
    """Everything known about one instance, as the ``saga show --json`` document."""
    store = cli.store()
    inst = store.load(saga_id)
    defn = _definition(cli, inst)
    queries = Queries(store)
    keys = [idempotency_key(inst.id, s.name, p) for s in inst.steps for p in Phase]
    absorbed = queries.duplicates_absorbed(keys)
    return {
        "instance": instance_json(inst),
        "steps": [step_json(inst, s, defn, absorbed) for s in inst.steps],
        "events": [e.to_json() for e in queries.timeline(inst.id)],
        "dead_letters": [
            d.to_json() for d in reversed(queries.dead_letters(saga_id=inst.id, open_only=False))
        ],
        "operator_actions": [
            a.to_json() for a in reversed(queries.operator_actions(saga_id=inst.id))
        ],
        "allowed_actions": (
            None if defn is None else [str(a) for a in allowed_actions(inst, defn, now_ms())]
        ),
    }


def _definition(cli: Cli, inst: Instance) -> Saga | None:
    # Showing works without -A; only the step kinds and allowed actions need it.
    try:
        return cli.registry().get(inst.saga_name, inst.saga_version)
    except UnknownSaga:
        return None


def instance_json(inst: Instance) -> dict[str, Any]:
    """The ``instance`` object of the JSON documents."""
    return {
        "id": inst.id,
        "saga_name": inst.saga_name,
        "saga_version": inst.saga_version,
        "state": str(inst.state),
        "phase": None if inst.state.is_final else str(inst.phase),
        "current_step": inst.cursor,
        "current_step_name": inst.current.name,
        "step_count": len(inst.steps),
        "payload": inst.payload,
        "correlation_id": inst.correlation_id,
        "business_key": inst.business_key,
        "idempotency_key": inst.idempotency_key,
        "version": inst.version,
        "created_at": inst.created_at,
        "updated_at": inst.updated_at,
        "last_progress_at": inst.last_progress_at,
        "next_run_at": inst.next_run_at,
        "lease_owner": inst.lease_owner,
        "lease_expires_at": inst.lease_expires_at,
    }


def step_json(
    inst: Instance, step: StepState, defn: Saga | None, absorbed: dict[str, int]
) -> dict[str, Any]:
    """One element of ``steps``: the action side and the compensation side."""
    action_key = idempotency_key(inst.id, step.name, Phase.ACTION)
    comp_key = idempotency_key(inst.id, step.name, Phase.COMPENSATE)
    return {
        "index": step.index,
        "name": step.name,
        "kind": None if defn is None else str(defn.steps[step.index].kind),
        "action": {
            "status": str(step.status),
            "attempts": step.attempts,
            "started_at": step.started_at,
            "finished_at": step.finished_at,
            "deadline_at": step.deadline_at,
            "output": step.output,
            "error": step.error,
            "idempotency_key": action_key,
            "duplicates_absorbed": absorbed.get(action_key, 0),
        },
        "compensation": {
            "status": str(step.comp_status),
            "attempts": step.comp_attempts,
            "started_at": step.comp_started_at,
            "finished_at": step.comp_finished_at,
            "deadline_at": step.comp_deadline_at,
            "error": step.comp_error,
            "idempotency_key": comp_key,
            "duplicates_absorbed": absorbed.get(comp_key, 0),
        },
    }
