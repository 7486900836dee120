"""Domain events for choreographed sagas: publish, subscribe, run handlers.

Services publish facts and react to each other's facts; nobody sends
commands::

    from engine.events import EventHandlers, EventContext

    inventory = EventHandlers("inventory")

    @inventory.on("OrderPlaced")
    def reserve(ctx: EventContext) -> None:
        ctx.guard.run_once(ctx.idempotency_key, lambda conn: ...)  # the effect, once
        ctx.publish("InventoryReserved", {"sku": ctx.event.data["sku"]})

``saga participant -A MODULE`` runs the :class:`EventHandlers` of ``MODULE``
(:class:`EventRuntime`), alongside any command handlers; ``--service`` picks
some. With Redis, every event goes to one stream, ``<prefix>:events``, read by
one consumer group per handler service, so each service sees every event and
the processes of one service share them. Delivery is at least once: an event
is acknowledged after its handlers ran, so a process that dies mid-handler
leaves it pending and another process of the same service takes it over
(XAUTOCLAIM, after ``SAGA_REDIS_CLAIM_IDLE_SECONDS``). Handlers are therefore
given an idempotency key, ``<event id>:<service>.<handler>``, and the
:class:`~engine.idempotency.IdempotencyGuard`; events a handler publishes get
ids derived from the event it handles, so a redelivery republishes the same
events and the next services' keys absorb them.

A handler that raises is tried again ``max_attempts`` times in all; then the
event is dead-lettered for that handler (a row in ``saga_event_dead_letters``,
listed by the console) and acknowledged. An entry that is not an event at all
is dead-lettered with the reason and set aside on the poison stream; nothing
crashes. Without Redis, :class:`InProcessEventLog` carries events between the
threads of one process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from engine import metrics
from engine.bus import Entry, RedisBus
from engine.choreography import (
    Choreography,
    DomainEvent,
    Tracker,
    compensation_plan,
)
from engine.errors import InvalidInput, InvalidTransition, TransportError
from engine.idempotency import IdempotencyGuard
from engine.interventions import FORCE_COMPENSATE, REPUBLISH
from engine.model import now_ms

if TYPE_CHECKING:
    from engine.settings import Settings
    from engine.store import Store

log = logging.getLogger(__name__)

#: The consumer group (and handler service name) of the choreography tracker.
TRACKER_SERVICE = "choreography-tracker"
_FIELDS = ("id", "type", "correlation_id", "data", "at")
_MAX_TEXT = 200


class EventLog(Protocol):
    """An append-only log of events, read through consumer groups."""

    in_process: bool
    #: How often to :meth:`keep` the entries in hand, in seconds; None: never needed.
    keep_every: float | None

    def append(self, fields: Mapping[str, str]) -> None:
        """Append one event's fields; raises :class:`~engine.errors.TransportError`."""

    def read(self, group: str, consumer: str, count: int, timeout: float) -> list[Entry]:
        """Up to ``count`` entries ``group`` has not yet handled, waiting up to ``timeout`` s."""

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        """Mark entries handled by ``group``."""

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        """Set a malformed entry aside and acknowledge it."""

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        """Say that ``consumer`` still works on ``entries`` (see ``CommandBus.keep``)."""

    def close(self) -> None:
        """Release connections."""


class InProcessEventLog:
    """Events shared by the threads of one process; each group reads every event once."""

    in_process = True
    keep_every: float | None = None

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._offsets: dict[str, int] = {}
        self._ready = threading.Condition()
        #: Malformed entries set aside: (group, entry, reason).
        self.poisoned: list[tuple[str, Entry, str]] = []

    def append(self, fields: Mapping[str, str]) -> None:
        raw = {k.encode(): v.encode("utf-8", "surrogatepass") for k, v in fields.items()}
        with self._ready:
            self._entries.append(Entry("events", f"{len(self._entries) + 1}-0", raw))
            self._ready.notify_all()

    def read(self, group: str, consumer: str, count: int, timeout: float) -> list[Entry]:
        with self._ready:
            # A group created now reads from the start, like a Redis group made from id 0.
            start = self._offsets.setdefault(group, 0)
            self._ready.wait_for(lambda: len(self._entries) > start, timeout=max(timeout, 0.0))
            taken = self._entries[start : start + count]
            self._offsets[group] = start + len(taken)
            return taken

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        return None  # read means taken: there is no redelivery in one process

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        self.poisoned.append((group, entry, reason))

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        return None  # nothing is taken over in one process

    def close(self) -> None:
        return None


class RedisEventLog:
    """Events on the Redis stream ``<prefix>:events``, one consumer group per service.

    Each group reads through a client of its own, so that the scans for
    entries a dead process left pending (XAUTOCLAIM) keep one cursor per group.
    """

    in_process = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "saga",
        client_name: str = "events",
        maxlen: int = 100_000,
        claim_idle_seconds: float = 30.0,
        max_deliveries: int = 10,
    ) -> None:
        def make(name: str) -> RedisBus:
            return RedisBus(
                url,
                prefix=prefix,
                client_name=f"{client_name}:{name}",
                maxlen=maxlen,
                claim_idle_seconds=claim_idle_seconds,
                max_deliveries=max_deliveries,
            )

        self._make: Callable[[str], RedisBus] = make
        self._writer = self._make("publish")
        self.stream = f"{self._writer.prefix}:events"
        self.keep_every = self._writer.keep_every
        self._readers: dict[str, RedisBus] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisEventLog:
        if not settings.redis_url:
            raise InvalidInput("SAGA_REDIS_URL", "is not set; the Redis event bus needs it")
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            client_name=f"events:{settings.worker_id}",
            maxlen=settings.redis_stream_maxlen,
            claim_idle_seconds=settings.redis_claim_idle_seconds,
            max_deliveries=settings.redis_max_deliveries,
        )

    @property
    def client(self) -> Any:
        """The Redis client events are published with, for operators' tools and tests."""
        return self._writer.client

    def append(self, fields: Mapping[str, str]) -> None:
        self._writer.send(self.stream, fields)

    def read(self, group: str, consumer: str, count: int, timeout: float) -> list[Entry]:
        return self._reader(group).read([self.stream], group, consumer, count, timeout)

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        self._reader(group).ack(group, entries)

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        self._reader(group).poison(group, entry, reason)

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        self._reader(group).keep(group, consumer, entries)

    def close(self) -> None:
        self._writer.close()
        for reader in self._readers.values():
            reader.close()

    def _reader(self, group: str) -> RedisBus:
        with self._lock:
            if group not in self._readers:
                self._readers[group] = self._make(group)
            return self._readers[group]


def event_log_from_settings(settings: Settings) -> EventLog:
    """Redis when ``SAGA_REDIS_URL`` is set, else an in-process log."""
    if settings.redis_url:
        return RedisEventLog.from_settings(settings)
    return InProcessEventLog()


class EventBus:
    """Publishes domain events on an :class:`EventLog`."""

    def __init__(self, log_: EventLog) -> None:
        self.log = log_

    def publish(
        self,
        event_type: str,
        data: Mapping[str, Any] | None = None,
        *,
        correlation_id: str,
        event_id: str | None = None,
        at: int | None = None,
    ) -> str:
        """Append one event; returns its id (a new UUID unless ``event_id`` is given)."""
        for name, value in (("event type", event_type), ("correlation id", correlation_id)):
            if not value or len(value) > _MAX_TEXT:
                raise InvalidInput(name, f"must be 1-{_MAX_TEXT} characters")
        ident = event_id or str(uuid.uuid4())
        self.log.append(
            {
                "id": ident,
                "type": event_type,
                "correlation_id": correlation_id,
                "data": json.dumps(dict(data or {}), separators=(",", ":")),
                "at": str(now_ms() if at is None else at),
            }
        )
        return ident


class BadEvent(ValueError):
    """An entry that is not a well-formed event; the message says why."""


def parse(entry: Entry) -> DomainEvent:
    """The event an entry carries; raises :class:`BadEvent` with the reason."""
    try:
        text = {k.decode(): v.decode() for k, v in entry.fields.items()}
    except UnicodeDecodeError as exc:
        raise BadEvent(f"not UTF-8: {exc}") from exc
    missing = [f for f in _FIELDS if not text.get(f)]
    if missing:
        raise BadEvent(f"missing field(s): {', '.join(missing)}")
    try:
        data = json.loads(text["data"])
    except json.JSONDecodeError as exc:
        raise BadEvent(f"data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadEvent("data is not a JSON object")
    if not text["at"].isdigit():
        raise BadEvent(f"at is not epoch milliseconds: {text['at'][:40]!r}")
    return DomainEvent(text["id"], text["type"], text["correlation_id"], data, int(text["at"]))


@dataclass(frozen=True)
class EventContext:
    """What a handler gets: the event, its once-only key, the guard, and a way to publish."""

    event: DomainEvent
    handler: str
    idempotency_key: str
    guard: IdempotencyGuard
    attempt: int
    bus: EventBus

    def publish(self, event_type: str, data: Mapping[str, Any] | None = None) -> str:
        """Publish a follow-up event with this event's correlation id.

        Its id is derived from the handled event, the handler and the type,
        so running the handler again publishes the same event again, which
        the next services' idempotency keys absorb.
        """
        seed = f"{self.event.id}/{self.handler}/{event_type}"
        return self.bus.publish(
            event_type,
            data,
            correlation_id=self.event.correlation_id,
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, seed)),
        )


Handler = Callable[[EventContext], Any]
H = TypeVar("H", bound=Handler)


class EventHandlers:
    """One service's handlers, by event type; its consumer group is the service name."""

    def __init__(self, service: str) -> None:
        if not service or len(service) > _MAX_TEXT:
            raise InvalidInput("service", f"must be 1-{_MAX_TEXT} characters")
        self.service = service
        self.handlers: dict[str, list[tuple[str, Handler]]] = {}

    def on(self, event_type: str) -> Callable[[H], H]:
        """Register the decorated function for ``event_type``."""

        def register(fn: H) -> H:
            self.add(event_type, fn)
            return fn

        return register

    def add(self, event_type: str, fn: Handler, name: str | None = None) -> None:
        handler = f"{self.service}.{name or fn.__name__}"
        self.handlers.setdefault(event_type, []).append((handler, fn))

    def for_type(self, event_type: str) -> list[tuple[str, Handler]]:
        return self.handlers.get(event_type, [])


class TrackerHandlers(EventHandlers):
    """The choreography tracker as a handler service; its runtime also flags stuck instances."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(TRACKER_SERVICE)
        self.tracker = tracker


def tracker_handlers(tracker: Tracker) -> TrackerHandlers:
    """The tracker as a handler service: every declared event moves its instance."""
    service = TrackerHandlers(tracker)

    def track_event(ctx: EventContext) -> None:
        tracker.apply(ctx.event)

    for event_type in tracker.event_types():
        service.add(event_type, track_event, "track")
    return service


def handlers_in(module: ModuleType) -> list[EventHandlers]:
    """The :class:`EventHandlers` among ``module``'s globals, each once."""
    found: list[EventHandlers] = []
    for value in vars(module).values():
        if isinstance(value, EventHandlers) and all(value is not h for h in found):
            found.append(value)
    return found


def choreographies_in(module: ModuleType) -> list[Choreography]:
    """The :class:`~engine.choreography.Choreography` declarations among ``module``'s globals."""
    return [v for v in vars(module).values() if isinstance(v, Choreography)]


class EventRuntime:
    """Reads events for some handler services, runs their handlers; ``stop()`` drains.

    One thread per service; each handles its events in stream order, so the
    tracker sees a correlation's events in the order they were published.
    """

    def __init__(
        self,
        services: Sequence[EventHandlers],
        log_: EventLog,
        store: Store,
        *,
        consumer: str,
        max_attempts: int = 3,
        retry_delay: float = 0.2,
        batch: int = 32,
        stuck_every: float = 5.0,
    ) -> None:
        self.services = list(services)
        self.log = log_
        self.bus = EventBus(log_)
        self.store = store
        self.consumer = consumer
        self.max_attempts = max(1, max_attempts)
        self.retry_delay = retry_delay
        self.batch = batch
        self.stuck_every = stuck_every
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: Per service, the entries read and not yet acknowledged: kept from takeover.
        self._in_hand: dict[str, list[Entry]] = {}
        #: Handled events, failed handler runs and dead letters, for tests and the benchmark.
        self.counts = {"handled": 0, "failed": 0, "dead_lettered": 0, "malformed": 0}
        self._guards = {s.service: IdempotencyGuard(store.db, s.service) for s in services}

    def start(self) -> EventRuntime:
        for service in self.services:
            thread = threading.Thread(
                target=self._serve, args=(service,), name=f"saga-events-{service.service}"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        if self.log.keep_every is not None:
            # A batch is handled one event after the other; the last ones may wait
            # longer than the idle time after which another process would take
            # them over and handle them a second time.
            keeper = threading.Thread(
                target=self._keep_in_hand, args=(self.log.keep_every,), name="saga-events-keeper"
            )
            keeper.daemon = True
            keeper.start()
        return self

    def _keep_in_hand(self, every: float) -> None:
        while not self._stopping.wait(every):
            with self._lock:
                in_hand = {group: list(entries) for group, entries in self._in_hand.items()}
            for group, entries in in_hand.items():
                try:
                    self.log.keep(group, self.consumer, entries)
                except TransportError as exc:
                    log.warning("events %s: could not keep events in hand: %s", group, exc)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop reading; finish the events in hand; True if every thread ended in time."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(t.is_alive() for t in self._threads)

    def _serve(self, service: EventHandlers) -> None:
        wait = 0.1 if self.log.in_process else 0.5
        down = False
        next_stuck_check = time.monotonic() + self.stuck_every
        while not self._stopping.is_set():
            if isinstance(service, TrackerHandlers) and time.monotonic() >= next_stuck_check:
                next_stuck_check = time.monotonic() + self.stuck_every
                self._flag_stuck(service.tracker)
            try:
                entries = self.log.read(service.service, self.consumer, self.batch, wait)
            except TransportError as exc:
                if not down:
                    log.warning("events %s: %s", service.service, exc)
                down = True
                self._stopping.wait(1.0)
                continue
            down = False
            self._hold(service.service, entries)
            for done, entry in enumerate(entries, start=1):
                self.handle(service, entry)
                self.log.ack(service.service, [entry])
                self._hold(service.service, entries[done:])

    def _hold(self, group: str, entries: list[Entry]) -> None:
        with self._lock:
            self._in_hand[group] = entries

    def _flag_stuck(self, tracker: Tracker) -> None:
        try:
            flagged = tracker.flag_stuck(now_ms())
        except SQLAlchemyError as exc:
            log.warning("could not look for stuck choreographies: %s", exc)
            return
        if flagged:
            log.warning("flagged %d choreographed saga(s) stuck: %s", len(flagged), flagged)

    def handle(self, service: EventHandlers, entry: Entry) -> None:
        """Run ``service``'s handlers for one entry; dead-letter what cannot be handled."""
        try:
            event = parse(entry)
        except BadEvent as exc:
            self._malformed(service, entry, str(exc))
            return
        for name, fn in service.for_type(event.type):
            self._run(service, name, fn, event, entry)
        self._count("handled")

    def _run(
        self, service: EventHandlers, name: str, fn: Handler, event: DomainEvent, entry: Entry
    ) -> None:
        for attempt in range(1, self.max_attempts + 1):
            ctx = EventContext(
                event, name, f"{event.id}:{name}", self._guards[service.service], attempt, self.bus
            )
            began = time.monotonic()
            try:
                fn(ctx)
                metrics.event_handled(name, "succeeded", time.monotonic() - began)
                return
            # Any handler failure is logged, retried, then dead-lettered: never hidden.
            except Exception as exc:
                self._count("failed")
                last = attempt == self.max_attempts
                outcome = "dead_lettered" if last else "failed"
                metrics.event_handled(name, outcome, time.monotonic() - began)
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s failed on %s (attempt %d): %s", name, event.id, attempt, error)
                if last:
                    self._dead_letter(name, event, entry, error, attempt, exc)
                    return
                self._stopping.wait(self.retry_delay * attempt)

    def _dead_letter(
        self,
        name: str,
        event: DomainEvent,
        entry: Entry,
        error: str,
        attempts: int,
        exc: BaseException,
    ) -> None:
        tb = "".join(traceback.format_exception(exc))
        self.store.add_event_dead_letter(
            handler=name,
            event_id=event.id,
            event_type=event.type,
            correlation_id=event.correlation_id,
            reason=f"{error}\n{tb}",
            attempts=attempts,
            fields=_text_fields(entry),
        )
        self._count("dead_lettered")

    def _malformed(self, service: EventHandlers, entry: Entry, reason: str) -> None:
        log.warning("malformed event %s for %s: %s", entry.id, service.service, reason)
        metrics.set_aside(entry.stream, "malformed")
        fields = _text_fields(entry)
        self.store.add_event_dead_letter(
            handler=service.service,
            event_id=fields.get("id"),
            event_type=fields.get("type"),
            correlation_id=fields.get("correlation_id"),
            reason=f"malformed event: {reason}",
            attempts=0,
            fields=fields,
        )
        self.log.poison(service.service, entry, reason)
        self._count("malformed")

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1


def _text_fields(entry: Entry) -> dict[str, str]:
    return {
        k.decode(errors="replace")[:_MAX_TEXT]: v.decode(errors="replace")
        for k, v in entry.fields.items()
    }


def event_services(
    modules: Iterable[ModuleType], store: Store
) -> tuple[list[EventHandlers], list[Choreography]]:
    """The handler services the modules define, plus the tracker when they declare
    choreographies."""
    modules = list(modules)
    services = [h for m in modules for h in handlers_in(m)]
    declared = [c for m in modules for c in choreographies_in(m)]
    if declared:
        services.append(tracker_handlers(Tracker(store, declared)))
    return services, declared


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

    def force_compensate(self, saga_id: str, *, actor: str, reason: str) -> list[str]:
        """Publish the compensating events still to go; returns those published now."""
        from engine.store import OperatorRecord

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
        record = OperatorRecord(actor, FORCE_COMPENSATE, reason, {"published": published})
        self.store.append_operator_note(inst, record, now_ms())
        return published

    def republish_last(self, saga_id: str, *, actor: str, reason: str) -> str:
        """Publish the last event the instance moved on again, same id and data; its type."""
        from engine.queries import Queries
        from engine.store import OperatorRecord

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
            inst, OperatorRecord(actor, REPUBLISH, reason, detail), now_ms()
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
