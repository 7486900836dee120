"""The event runtime: reads the event log for a set of handler services and runs them.

A handler that raises is tried again up to its service's ``max_attempts``; then
the event is dead-lettered for that handler and acknowledged. An entry that is
not an event at all is dead-lettered with the reason and set aside on the
poison stream; nothing crashes.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from types import ModuleType

from engine import metrics
from engine.choreography.declaration import Choreography, DomainEvent
from engine.choreography.handlers import (
    _MAX_TEXT,
    BadEvent,
    EventBus,
    EventContext,
    EventHandlers,
    Handler,
    TrackerHandlers,
    choreographies_in,
    handlers_in,
    parse,
    tracker_handlers,
)
from engine.choreography.tracker import Tracker
from engine.errors import TransportError
from engine.idempotency import IdempotencyGuard
from engine.model import now_ms
from engine.store import Store, StoreError
from engine.transport.event_log import EventLog
from engine.transport.streams import Entry

log = logging.getLogger(__name__)

#: The optional module-level hook ``saga participant`` calls with the event runtime.
INIT_HOOK = "init_event_handlers"


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
        except StoreError as exc:
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


def init_hooks(modules: Iterable[ModuleType], runtime: EventRuntime) -> None:
    """Call each module's ``init_event_handlers(runtime)``, where it has one.

    ``saga participant`` calls it once the runtime is built and before any event is
    read: the place for a module to set up what its handlers need (their tables, say).
    """
    for module in modules:
        hook = getattr(module, INIT_HOOK, None)
        if callable(hook):
            hook(runtime)
