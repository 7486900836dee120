"""Participant services: the other end of remote steps.

A participant is a module of handlers, one per command::

    from engine.participant import ParticipantService

    participant = ParticipantService("travel")

    @participant.handler("hotel.reserve")
    def reserve(ctx: StepContext) -> dict:
        return hotels.run_once(ctx.idempotency_key, ...)   # behind IdempotencyGuard

    @participant.handler("hotel.cancel")
    def cancel(ctx: StepContext, reservation: dict | None) -> None: ...

An action's handler is ``fn(ctx)`` and a compensation's ``fn(ctx, output)``,
exactly like in-process steps; ``ctx`` carries the saga id, the correlation
id, the payload, the outputs so far, the attempt and the idempotency key
(``<saga id>:<step>:action|compensate``, the same on every attempt and on a
redelivery). Returning is success (the value, JSON, is the step's output);
raising :class:`~engine.errors.NonRetryableError` fails the step for good;
any other exception is a failure the step's retry policy may try again.

``saga participant -A MODULE`` runs the handlers of ``MODULE`` in a process
of their own (:class:`ParticipantRuntime`): it reads the command streams of
the services its handlers name (``hotel`` for ``hotel.reserve``), or only
those given with ``--service``, and replies on the reply stream. A command
is acknowledged after its reply was sent, so a participant that dies
mid-command leaves it pending and another participant of the same service
takes it over; the idempotency key makes that repeat harmless. A command
whose deadline passed before it was read is dropped unrun: the worker has
already counted its attempt as timed out. Malformed commands are set aside as
poison records. Without Redis, ``engine.participant(...)`` runs the same
handlers as threads of the engine's process.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from engine import metrics
from engine.definition import COMMAND_NAME
from engine.errors import DefinitionError, InvalidInput, NonRetryableError, TransportError
from engine.logs import bound
from engine.model import now_ms
from engine.remote.messages import BadMessage, Command, Outcome, Reply
from engine.states import Phase
from engine.store import dumps, retry_on_disconnect
from engine.transport.commands import PARTICIPANTS, CommandBus, read_wait
from engine.transport.streams import Entry

if TYPE_CHECKING:
    from engine.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[..., Any]
H = TypeVar("H", bound=Handler)

#: The optional module-level hook ``saga participant`` calls with the runtime it built.
INIT_HOOK = "init_participant"


class ParticipantService:
    """Handlers for commands, by command name (``"<service>.<name>"``)."""

    def __init__(self, name: str = "participant") -> None:
        self.name = name
        self._handlers: dict[str, Handler] = {}

    def handler(self, command: str) -> Callable[[H], H]:
        """Decorator: ``fn`` handles ``command``; see the module's docstring for its signature."""

        def register(fn: H) -> H:
            self.add_handler(command, fn)
            return fn

        return register

    def add_handler(self, command: str, fn: Handler) -> None:
        if not isinstance(command, str) or not COMMAND_NAME.match(command):
            raise DefinitionError(
                self.name, command, "a command is 'service.name' of letters, digits, '_', '-', '.'"
            )
        if command in self._handlers:
            raise DefinitionError(self.name, command, "this command already has a handler")
        if not callable(fn):
            raise DefinitionError(self.name, command, "the handler is not callable")
        self._handlers[command] = fn

    def find(self, command: str) -> Handler | None:
        return self._handlers.get(command)

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def services(self) -> list[str]:
        """The services whose command streams these handlers serve."""
        return sorted({c.split(".", 1)[0] for c in self._handlers})


class ParticipantRuntime:
    """Reads commands for some services, runs their handlers, replies; ``stop()`` drains."""

    def __init__(
        self,
        services: Sequence[ParticipantService],
        bus: CommandBus,
        *,
        consumer: str,
        concurrency: int = 8,
        only: Sequence[str] = (),
        settings: Settings | None = None,
    ) -> None:
        self.participants = tuple(services)
        self.bus = bus
        self.consumer = consumer
        self.concurrency = concurrency
        #: The settings the process was started with, for ``init_participant`` hooks.
        self.settings = settings
        self.services = self._choose(only)
        self.streams = [bus.commands_stream(s) for s in self.services]
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="saga-participant")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._bus_down = False
        #: The commands being handled, by entry id: kept from being taken over.
        self._in_hand: dict[str, Entry] = {}
        self._lock = threading.Lock()
        #: How many commands ended in each outcome (and how many were dropped as expired).
        self.counts: dict[str, int] = {**dict.fromkeys(Outcome, 0), "expired": 0}

    def _choose(self, only: Sequence[str]) -> list[str]:
        offered = sorted({s for p in self.participants for s in p.services})
        if not offered:
            raise InvalidInput("--app", "the participant modules register no handlers")
        unknown = sorted(set(only) - set(offered))
        if unknown:
            raise InvalidInput(
                "--service",
                f"no handlers for {', '.join(unknown)}; these have: {', '.join(offered)}",
            )
        return sorted(only) if only else offered

    def start(self) -> ParticipantRuntime:
        """Run in a background thread of this process."""
        self._thread = threading.Thread(target=self.run, name="saga-participant", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop reading, finish the commands in hand (replying to each); True if in time."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        """Serve commands until :meth:`stop`, then drain."""
        log.info(
            "participant %s serving %s (concurrency %d)",
            self.consumer,
            ", ".join(self.services),
            self.concurrency,
        )
        drained = threading.Event()
        keeper = self._start_keeper(drained)
        while not self._stopping.is_set():
            free = self._free_slots()
            if free == 0:
                self._wait_for_a_slot()
                continue
            for entry in self._read(free):
                self._take(entry)
        self._pool.shutdown(wait=True)
        drained.set()
        if keeper is not None:
            keeper.join()
        log.info("participant %s stopped", self.consumer)

    # -- keeping the commands in hand ----------------------------------------------

    def _start_keeper(self, drained: threading.Event) -> threading.Thread | None:
        # A handler may run longer than the idle time after which other readers
        # take an entry over as abandoned; that would run it twice at once (and,
        # after enough takeovers, set it aside as a poison pill). So the commands
        # in hand are kept, a few times per idle period, until they are answered.
        every = self.bus.keep_every
        if every is None:
            return None
        keeper = threading.Thread(
            target=self._keep_in_hand, args=(every, drained), name="saga-keeper", daemon=True
        )
        keeper.start()
        return keeper

    def _keep_in_hand(self, every: float, drained: threading.Event) -> None:
        while not drained.wait(every):
            with self._lock:
                entries = list(self._in_hand.values())
            try:
                self.bus.keep(PARTICIPANTS, self.consumer, entries)
            except TransportError as exc:
                log.warning(
                    "participant %s: could not keep commands in hand: %s", self.consumer, exc
                )

    # -- reading ------------------------------------------------------------------

    def _read(self, count: int) -> list[Entry]:
        try:
            entries = self.bus.read(
                self.streams, PARTICIPANTS, self.consumer, count, read_wait(self.bus)
            )
        except TransportError as exc:
            if not self._bus_down:
                log.warning("participant %s: %s", self.consumer, exc)
            self._bus_down = True
            self._stopping.wait(1.0)
            return []
        if self._bus_down:
            log.info("participant %s: commands reachable again", self.consumer)
            self._bus_down = False
        return entries

    def _take(self, entry: Entry) -> None:
        try:
            command = Command.from_fields(entry.fields)
        except BadMessage as exc:
            self._poison(entry, str(exc))
            return
        if command.deadline_at <= now_ms():
            # Its attempt already counts as timed out; the worker tries again with a
            # new attempt if the policy allows, and that one is worth running.
            log.info(
                "%s for saga %s attempt %d arrived after its deadline; dropped",
                command.command,
                command.saga_id,
                command.attempt,
            )
            self._count("expired")
            metrics.command_expired(self._label(command.command))
            self._ack(entry)
            return
        self._slots.acquire()
        with self._lock:
            self._in_hand[entry.id] = entry
        self._pool.submit(self._serve, entry, command)

    # -- running a command ----------------------------------------------------------

    def _serve(self, entry: Entry, command: Command) -> None:
        metrics.PARTICIPANT_BUSY.inc()
        try:
            with bound(command.saga_id, command.correlation_id):
                reply = self.execute(command)
                label = self._label(command.command)
                metrics.command_waited(label, command.sent_at, reply.started_at)
                metrics.command_answered(label, reply.outcome, reply.started_at, reply.finished_at)
                if self._reply(reply, entry):
                    self._count(reply.outcome)
                else:
                    metrics.PARTICIPANT_REPLIES_UNSENT.labels(label).inc()
        finally:
            with self._lock:
                self._in_hand.pop(entry.id, None)
            metrics.PARTICIPANT_BUSY.dec()
            self._slots.release()

    def _label(self, command: str) -> str:
        # Command names come off the wire: only the ones handled here become
        # label values, so a stray producer cannot blow up the series count.
        return command if self._handler(command) is not None else "unknown"

    def execute(self, command: Command) -> Reply:
        """Run ``command``'s handler and build the reply; never raises for the handler's errors."""
        started = now_ms()
        handler = self._handler(command.command)
        if handler is None:
            # Retriable: during a rolling deploy a participant with the handler
            # may take the next attempt.
            return self._failed(command, Outcome.RETRY, self._no_handler(command), None, started)
        try:
            # A connection the database dropped fails the handler's first statement;
            # its transaction never committed, so running it again is safe.
            output = retry_on_disconnect(lambda: self._call(handler, command))
            dumps(output)
        except NonRetryableError as exc:
            return self._failed(command, Outcome.FAIL, _text(exc), _tb(exc), started)
        except InvalidInput as exc:
            problem = f"{command.command} returned a value that is not JSON: {exc.problem}"
            return self._failed(command, Outcome.FAIL, problem, None, started)
        except Exception as exc:
            # Reported to the worker with its traceback, which records it on the timeline.
            return self._failed(command, Outcome.RETRY, _text(exc), _tb(exc), started)
        return Reply.to(
            command,
            Outcome.SUCCESS,
            output=output,
            participant=self.consumer,
            started_at=started,
            finished_at=now_ms(),
        )

    def _call(self, handler: Handler, command: Command) -> Any:
        ctx = command.context()
        if command.phase is Phase.COMPENSATE:
            return handler(ctx, command.output)
        return handler(ctx)

    def _handler(self, name: str) -> Handler | None:
        for participant in self.participants:
            found = participant.find(name)
            if found is not None:
                return found
        return None

    def _no_handler(self, command: Command) -> str:
        known = sorted({c for p in self.participants for c in p.commands})
        return (
            f"participant {self.consumer} has no handler for {command.command!r} "
            f"(it handles {', '.join(known)})"
        )

    def _failed(
        self, command: Command, outcome: Outcome, error: str, tb: str | None, started: int
    ) -> Reply:
        return Reply.to(
            command,
            outcome,
            error=error,
            traceback=tb,
            participant=self.consumer,
            started_at=started,
            finished_at=now_ms(),
        )

    # -- replying --------------------------------------------------------------------

    def _reply(self, reply: Reply, entry: Entry, attempts: int = 3) -> bool:
        """Send the reply, then acknowledge the command (one round trip)."""
        for attempt in range(1, attempts + 1):
            try:
                self.bus.send_and_ack(
                    [(self.bus.replies_stream, reply.to_fields())], PARTICIPANTS, [entry]
                )
                return True
            except TransportError as exc:
                if attempt == attempts:
                    # Left unacknowledged, the command is taken over later and run
                    # again under its idempotency key; the reply is sent then.
                    log.warning("reply to %s not sent: %s", reply.command, exc)
                    return False
                self._stopping.wait(0.2 * attempt)
        return False

    def _ack(self, entry: Entry) -> None:
        try:
            self.bus.ack(PARTICIPANTS, [entry])
        except TransportError as exc:
            log.warning("could not acknowledge command %s: %s", entry.id, exc)

    def _poison(self, entry: Entry, reason: str) -> None:
        metrics.set_aside(entry.stream, "malformed")
        try:
            self.bus.poison(PARTICIPANTS, entry, reason)
        except TransportError as exc:
            log.warning("could not set aside malformed command %s: %s", entry.id, exc)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def _wait_for_a_slot(self) -> None:
        # Blocks rather than polls: a busy participant would otherwise wake
        # hundreds of times a second only to find its handlers still busy.
        if self._slots.acquire(timeout=0.1):
            self._slots.release()

    def _free_slots(self) -> int:
        taken = 0
        while taken < self.concurrency and self._slots.acquire(blocking=False):
            taken += 1
        for _ in range(taken):
            self._slots.release()
        return taken


def participants_in(module: ModuleType) -> list[ParticipantService]:
    """The :class:`ParticipantService` objects among ``module``'s globals, each once."""
    found: list[ParticipantService] = []
    for value in vars(module).values():
        if isinstance(value, ParticipantService) and all(value is not p for p in found):
            found.append(value)
    return found


def load_participants(modules: Iterable[ModuleType]) -> list[ParticipantService]:
    """Every participant service the modules define; a module without one is an error."""
    services: list[ParticipantService] = []
    for module in modules:
        found = participants_in(module)
        if not found:
            raise InvalidInput(
                "--app", f"module {module.__name__!r} defines no ParticipantService at module level"
            )
        services.extend(found)
    return services


def init_hooks(modules: Iterable[ModuleType], runtime: ParticipantRuntime) -> None:
    """Call each module's ``init_participant(runtime)``, where it has one."""
    for module in modules:
        hook = getattr(module, INIT_HOOK, None)
        if callable(hook):
            hook(runtime)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
