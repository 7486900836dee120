"""The collaborators a running engine shares, built once by the composition root.

:class:`~engine.runtime.SagaEngine` builds one :class:`Collaborators` from its
settings and hands it down: the executor, the worker, the reply listener, the
sweeps and bulk recovery each take it (or the few members they use) when they
are constructed. Nothing below the root imports the root, and nothing is
wired by assignment after construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.registry import Registry
from engine.settings import Settings
from engine.store import Store
from engine.transport.commands import CommandBus
from engine.transport.doorbells import Transport

#: Epoch milliseconds now; injected so that tests can move time.
Clock = Callable[[], int]


@dataclass(frozen=True)
class Collaborators:
    """The store, the registered sagas, the transports, the clock and who we are."""

    settings: Settings
    store: Store
    registry: Registry
    #: Doorbells for workers ("look at saga X").
    transport: Transport
    #: Remote steps' commands and replies (Redis, or this process's queues).
    bus: CommandBus
    clock: Clock
    #: This process's name in leases, timelines and consumer groups.
    owner: str

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    def with_clock(self, clock: Clock) -> Collaborators:
        return replace(self, clock=clock)
