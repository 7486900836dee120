"""Choreographed sagas: services react to each other's domain events; the engine follows.

- :mod:`.declaration`: what a choreography declares (:class:`Choreography`, its steps);
- :mod:`.track`: the pure tracker core, one event in, the next snapshot out;
- :mod:`.tracker`: applies events to instances in the store;
- :mod:`.handlers`: ``EventHandlers`` and the ``EventContext`` a handler gets;
- :mod:`.runtime`: runs handler services over the event log;
- :mod:`.operations`: operator actions (force-compensate, re-publish), audited.
"""

from engine.choreography.declaration import Choreography, ChoreoStep, DomainEvent
from engine.choreography.handlers import EventContext, EventHandlers

__all__ = ["ChoreoStep", "Choreography", "DomainEvent", "EventContext", "EventHandlers"]
