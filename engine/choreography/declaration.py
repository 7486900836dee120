"""What a choreographed saga declares so the engine can follow it.

In a choreography no coordinator sends commands: each service reacts to the
others' domain events (:mod:`engine.choreography.handlers`) and publishes its
own. A :class:`Choreography` declares what the engine should expect so that
it can show where each instance stands: the event that starts one, the event
that marks each step done, the failure events, the event each step publishes
when it undoes its work, and how long each step is expected to take.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from engine.errors import DefinitionError

#: The value of ``saga_instances.kind`` for instances the tracker keeps.
CHOREOGRAPHED = "choreographed"


#: The actor the tracker writes in the timeline.
TRACKER = "choreography-tracker"


@dataclass(frozen=True)
class DomainEvent:
    """One domain event as the tracker sees it."""

    id: str
    type: str
    correlation_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    at: int = 0  # epoch milliseconds when it was published


@dataclass(frozen=True)
class ChoreoStep:
    """One step of a choreography: the event that marks it done, and the one that undoes it."""

    name: str
    done: str
    compensated_by: str | None = None  # None: nothing to undo (a pivot or a final step)
    expected: timedelta = timedelta(seconds=30)

    @property
    def expected_ms(self) -> int:
        return int(self.expected.total_seconds() * 1000)


@dataclass(frozen=True)
class Choreography:
    """What to expect of a choreographed saga; validated when built."""

    name: str
    start: str
    steps: tuple[ChoreoStep, ...]
    #: Failure event type -> the name of the step that failed.
    failures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.start:
            raise DefinitionError(
                self.name, None, "a choreography needs a name and a starting event"
            )
        if not self.steps:
            raise DefinitionError(self.name, None, "a choreography needs at least one step")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise DefinitionError(self.name, None, "step names must be unique")
        types = [self.start, *(s.done for s in self.steps), *self.failures]
        types += [s.compensated_by for s in self.steps if s.compensated_by]
        if len(set(types)) != len(types):
            raise DefinitionError(self.name, None, "each event type may play one role only")
        for event_type, step in self.failures.items():
            if step not in names:
                raise DefinitionError(
                    self.name, step, f"failure event {event_type!r} names no declared step"
                )

    def event_types(self) -> list[str]:
        """Every event type the tracker consumes for this choreography."""
        found = [self.start, *(s.done for s in self.steps), *self.failures]
        return found + [s.compensated_by for s in self.steps if s.compensated_by]

    def index_of(self, step: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.name == step)
