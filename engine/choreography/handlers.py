"""Domain events for choreographed sagas: publish, subscribe, run handlers.

Services publish facts and react to each other's facts; nobody sends
commands::

    from engine.choreography import EventHandlers, EventContext

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
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from engine.choreography.declaration import Choreography, DomainEvent
from engine.choreography.tracker import Tracker
from engine.errors import InvalidInput
from engine.idempotency import IdempotencyGuard
from engine.inputs import MAX_BIGINT, parse_int, problem_in_text
from engine.model import now_ms
from engine.transport.event_log import EventLog
from engine.transport.streams import Entry

log = logging.getLogger(__name__)


#: The consumer group (and handler service name) of the choreography tracker.
TRACKER_SERVICE = "choreography-tracker"


_FIELDS = ("id", "type", "correlation_id", "data", "at")


_MAX_TEXT = 200


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
    for name in _FIELDS:
        problem = problem_in_text(text[name])  # the tracker stores them
        if problem is not None:
            raise BadEvent(f"{name} {problem}")
    try:
        data = json.loads(text["data"])
    except json.JSONDecodeError as exc:
        raise BadEvent(f"data is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadEvent("data is not a JSON object")
    try:
        at = parse_int("at", text["at"], low=0, high=MAX_BIGINT)
    except InvalidInput as exc:
        raise BadEvent(f"at is not epoch milliseconds: {exc.problem}") from exc
    return DomainEvent(text["id"], text["type"], text["correlation_id"], data, at)


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
