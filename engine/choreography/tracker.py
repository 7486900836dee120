"""The tracker: applies domain events to choreographed instances in the store.

One instance per correlation id (its idempotency key is ``choreo:<correlation
id>``); each event is applied through the pure :func:`~engine.choreography.track.track`
and saved with a version check, so concurrent handlers never overwrite each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.choreography.declaration import TRACKER, Choreography, DomainEvent
from engine.choreography.track import instance_key, missing_compensations, track
from engine.errors import ConcurrencyConflict, DefinitionError
from engine.model import Instance
from engine.states import SagaState
from engine.store import Store, StuckMark

# -- the tracker: the pure core on top of the store -------------------------


class Tracker:
    """Applies domain events to the stored instances of the declared choreographies."""

    def __init__(self, store: Store, choreographies: Sequence[Choreography]) -> None:
        self.store = store
        self.by_type: dict[str, Choreography] = {}
        for decl in choreographies:
            for event_type in decl.event_types():
                if event_type in self.by_type:
                    raise DefinitionError(
                        decl.name, None, f"event {event_type!r} is declared twice"
                    )
                self.by_type[event_type] = decl

    def event_types(self) -> list[str]:
        return sorted(self.by_type)

    def apply(self, event: DomainEvent, attempts: int = 5) -> Instance | None:
        """Apply ``event``; returns the instance as stored, or None when it is not tracked."""
        decl = self.by_type.get(event.type)
        if decl is None:
            return None
        for attempt in range(attempts):
            try:
                return self._apply_once(decl, event)
            except ConcurrencyConflict:
                if attempt == attempts - 1:
                    raise
                # Another tracker moved it on: read it again.
        return None

    def _apply_once(self, decl: Choreography, event: DomainEvent) -> Instance | None:
        inst = self.store.find_by_key(decl.name, instance_key(event.correlation_id))
        transition = track(decl, inst, event)
        if transition is None:
            return inst
        if inst is None:
            created, fresh = self.store.create(transition, TRACKER)
            if fresh:
                return created
            return self._apply_once(decl, event)  # another tracker created it first
        return self.store.save(inst, transition, TRACKER)

    # -- stuck detection ------------------------------------------------------

    def stuck_rules(self) -> list[tuple[int, list[tuple[str, int, int]]]]:
        """(expected ms, the (choreography, 1, step index) it applies to), shortest first."""
        by_ms: dict[int, list[tuple[str, int, int]]] = {}
        for decl in {id(d): d for d in self.by_type.values()}.values():
            for index, step in enumerate(decl.steps):
                by_ms.setdefault(step.expected_ms, []).append((decl.name, 1, index))
        return sorted(by_ms.items())

    def flag_stuck(self, now: int, limit: int = 100) -> list[str]:
        """Flag the instances whose expected event is overdue; returns their ids.

        The same flag as the stuck sweep's for orchestrated sagas: ``stuck_since``
        and a ``stuck_detected`` timeline event naming the missing event; the
        next event that moves the instance clears it.
        """
        by_name = {d.name: d for d in self.by_type.values()}
        marks = []
        for found in self.store.sweeps.stuck_candidates(now, self.stuck_rules(), limit):
            decl = by_name[found.saga_name]
            step = decl.steps[found.current_step]
            inst = self.store.load(found.id)
            missing = (
                missing_compensations(decl, inst)
                if found.state is SagaState.COMPENSATING
                else [step.done]
            )
            detail = {
                "why": f"expected {', '.join(missing)} within {step.expected_ms // 1000}s "
                "of the last event, and it has not arrived",
                "missing": missing,
                "no_progress_since": found.last_progress_at,
                "allowed_ms": step.expected_ms,
                "policy": "alert",
                "action": "none",
            }
            marks.append(StuckMark(found, step.name, detail))
        return self.store.sweeps.mark_stuck(marks, now, TRACKER) if marks else []
