"""The engine as a library: register sagas, start instances, run workers.

A service imports this, starts sagas, and runs workers as threads in its own
process; ``saga worker`` is the same code with a command around it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine import interventions
from engine.bulk.recovery import BulkRecovery
from engine.collaborators import Clock, Collaborators
from engine.definition import Saga
from engine.executor import Executor
from engine.inputs import check_id, check_key
from engine.model import Event, EventKind, Instance, StepState, Transition, new_id, now_ms
from engine.operations import Operations, check_actor, check_reason
from engine.origins import IN_PROCESS, Origin
from engine.registry import Registry
from engine.remote.dispatch import Dispatcher
from engine.remote.participant import ParticipantRuntime, ParticipantService
from engine.settings import Settings
from engine.signals import Delivered, deliver
from engine.states import SagaState
from engine.store import OperatorRecord, Store, dumps, open_store, retry_on_disconnect
from engine.store.leader import LeaderLock
from engine.sweeper.passes import Sweeps
from engine.sweeper.scheduler import Sweeper
from engine.transport.commands import CommandBus, bus_from_settings
from engine.transport.doorbells import InProcessQueue, Transport, ring
from engine.transport.redis_doorbells import RedisStreamsTransport
from engine.worker import Worker


@dataclass(frozen=True)
class Started:
    """What :meth:`SagaEngine.start` returns: the instance, and whether this call created it."""

    instance: Instance
    created: bool

    @property
    def id(self) -> str:
        return self.instance.id


class SagaEngine:
    """Registered sagas plus a store and a transport."""

    def __init__(
        self,
        sagas: Iterable[Saga] = (),
        *,
        settings: Settings | None = None,
        store: Store | None = None,
        transport: Transport | None = None,
        bus: CommandBus | None = None,
        clock: Clock = now_ms,
    ) -> None:
        settings = settings or Settings.from_env()
        self.collaborators = Collaborators(
            settings=settings,
            store=store
            or open_store(settings.database_url, pool_size=max(settings.concurrency, 5)),
            registry=Registry(sagas),
            transport=transport or _default_transport(settings),
            bus=bus or bus_from_settings(settings),
            clock=clock,
            owner=settings.worker_id,
        )
        c = self.collaborators
        self.executor = Executor(c, Dispatcher(c.bus, c.clock))
        self.operations = Operations(c.store, c.registry, c.transport, c.clock)
        self._participants: list[ParticipantRuntime] = []

    # The collaborators, by name, for callers of the library.

    @property
    def settings(self) -> Settings:
        return self.collaborators.settings

    @property
    def store(self) -> Store:
        return self.collaborators.store

    @property
    def registry(self) -> Registry:
        return self.collaborators.registry

    @property
    def transport(self) -> Transport:
        return self.collaborators.transport

    @property
    def bus(self) -> CommandBus:
        return self.collaborators.bus

    @property
    def clock(self) -> Clock:
        return self.collaborators.clock

    @property
    def owner(self) -> str:
        return self.collaborators.owner

    @property
    def lease_ms(self) -> int:
        return self.collaborators.lease_ms

    def register(self, saga: Saga) -> None:
        self.registry.add(saga)

    def start(
        self,
        saga_name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        business_key: str | None = None,
        idempotency_key: str | None = None,
    ) -> Started:
        """Create an instance and ring a worker; the same idempotency key returns the same one."""
        transition = self._new_instance(
            saga_name, payload, correlation_id, business_key, idempotency_key
        )
        defn = self.registry.latest(saga_name)
        first = None
        if defn.steps[0].remote is not None:
            # A remote first step needs no worker to begin: its attempt is stored
            # with the instance, and its command goes out after that commit.
            transition, first = self.executor.plan(transition, defn)
        inst, created = retry_on_disconnect(lambda: self.store.create(transition, self.owner))
        if created and first is not None:
            self.executor.dispatcher.send(inst, first.run.index, first.run.phase, defn)
        elif created:
            ring(self.transport, inst.id)
        return Started(inst, created)

    def run(
        self,
        saga_name: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        business_key: str | None = None,
        idempotency_key: str | None = None,
    ) -> Instance:
        """Start an instance and advance it in this thread until it finishes or must wait.

        The instance is durable from its first commit: if this process dies,
        its lease expires and a worker takes it over.
        """
        transition = self._new_instance(
            saga_name,
            payload,
            correlation_id,
            business_key,
            idempotency_key,
            lease_owner=self.owner,
        )
        defn = self.registry.latest(saga_name)
        transition, step = self.executor.plan(transition, defn)
        assert step is not None, "a new instance always has a first step to run"
        return self.executor.start_inline(transition, step)

    def get(self, saga_id: str) -> Instance:
        """The instance ``saga_id``; SagaNotFound, or InvalidInput for an id no store could hold."""
        return self.store.load(check_id("saga id", saga_id))

    def worker(self, concurrency: int | None = None) -> Worker:
        """A worker on this engine (``start()`` it, ``stop()`` to drain)."""
        return Worker(self.collaborators, self.executor, concurrency or self.settings.concurrency)

    def sweeper(self, *, lock: LeaderLock | None = None, clock: Clock | None = None) -> Sweeper:
        """The sweeps of this engine's store on their schedule, run while this process leads."""
        return Sweeper(self._timed(clock), lock=lock)

    def sweeps(self, *, clock: Clock | None = None) -> Sweeps:
        """The sweeps of this engine's store, to run one by one (tests, cron, benchmarks)."""
        return Sweeps(self._timed(clock))

    def bulk_recovery(self) -> BulkRecovery:
        """Bulk operator actions over the instances a filter matches (console, ``saga bulk``)."""
        return BulkRecovery(self.collaborators)

    def signal(
        self,
        saga_id: str,
        event: str,
        data: Any = None,
        *,
        sent_by: str = "api",
        reason: str | None = None,
        expected_version: int | None = None,
        origin: Origin = IN_PROCESS,
    ) -> Delivered:
        """Deliver the external event ``event`` (with JSON ``data``) to a waiting step.

        Stored first, then taken by the step waiting for it (now, or when it
        begins); see :mod:`engine.signals` for what is refused. With ``reason``,
        a person sent it: the audit log records it as their action (``sent_by``),
        like any operator's, in the same transaction. ``origin`` is the door it
        came through (the CLI, the console), kept beside ``sent_by``, which is a
        claim. With ``expected_version``, an instance that changed since the
        caller saw it raises ConcurrencyConflict.
        """
        operator = None
        if reason is not None:
            actor, why = check_actor(sent_by), check_reason(reason)
            operator = OperatorRecord(actor, interventions.SIGNAL, why, origin=origin)
        return deliver(
            self.collaborators,
            saga_id,
            event,
            data,
            sent_by=sent_by,
            operator=operator,
            expected_version=expected_version,
            origin=origin,
        )

    def participant(
        self, *services: ParticipantService, concurrency: int = 8, only: Iterable[str] = ()
    ) -> ParticipantRuntime:
        """A participant runtime on this engine's bus (``start()`` it, ``stop()`` to drain).

        With the in-process bus this is how remote steps run without Redis:
        the participants' handlers run as threads of this process.
        """
        runtime = ParticipantRuntime(
            services,
            self.bus,
            consumer=f"{self.owner}:participant",
            concurrency=concurrency,
            only=tuple(only),
            settings=self.settings,
        )
        self._participants.append(runtime)  # stopped (drained) by close()
        return runtime

    def close(self) -> None:
        for runtime in self._participants:
            runtime.stop()
        self.executor.shutdown()
        self.transport.close()
        self.bus.close()
        self.store.dispose()

    def _timed(self, clock: Clock | None) -> Collaborators:
        return self.collaborators if clock is None else self.collaborators.with_clock(clock)

    def _new_instance(
        self,
        saga_name: str,
        payload: Any,
        correlation_id: str | None,
        business_key: str | None,
        idempotency_key: str | None,
        lease_owner: str | None = None,
    ) -> Transition:
        defn = self.registry.latest(saga_name)
        dumps(payload)
        for field, value in (
            ("correlation id", correlation_id),
            ("business key", business_key),
            ("idempotency key", idempotency_key),
        ):
            check_key(field, value)
        now = self.clock()
        inst = Instance(
            id=new_id(now),
            saga_name=defn.name,
            saga_version=defn.version,
            state=SagaState.RUNNING,
            cursor=0,
            steps=tuple(StepState(i, s.name) for i, s in enumerate(defn.steps)),
            payload=payload,
            correlation_id=correlation_id or str(uuid.uuid4()),
            business_key=business_key,
            idempotency_key=idempotency_key,
            version=1,
            created_at=now,
            updated_at=now,
            last_progress_at=now,
            next_run_at=now,
            lease_owner=lease_owner,
            lease_expires_at=now + self.lease_ms if lease_owner else None,
        )
        return Transition(inst, (Event(EventKind.SAGA_STARTED, detail={"version": defn.version}),))


def _default_transport(settings: Settings) -> Transport:
    if settings.redis_url:
        return RedisStreamsTransport.from_settings(settings)
    return InProcessQueue()
