"""Remote steps, the orchestrator's side: send commands, record replies.

A remote step (``saga.remote_step("reserve_hotel", "hotel.reserve", ...)``)
is carried out by a participant service (:mod:`engine.participant`). Its
life, attempt by attempt:

1. A worker begins the attempt: one transaction stores it as running, with
   its deadline as the instance's ``next_run_at``, and releases the lease.
   No thread waits for the participant.
2. After that commit, :class:`Dispatcher` sends a :class:`Command` on the
   service's command stream (``<prefix>:commands:<service>``).
3. The participant replies on ``<prefix>:replies``: success (with the
   output), a retriable failure, or a non-retryable failure.
4. A worker's :class:`ReplyListener` reads the reply and
   :class:`ReplyHandler` records it, if it is for the attempt in flight and
   the deadline has not passed, through the pure transitions of
   :mod:`engine.decide`, in one version-checked transaction which also
   begins the next attempt when that is remote too. Any other reply (late,
   repeated, for an attempt that was superseded or stopped by an operator) is
   noted on the timeline as ``result_discarded`` and otherwise ignored.
5. If no reply comes, the deadline makes the instance due; a worker finds the
   attempt expired, records it as timed out, and the retry policy applies.

A command or reply is a few fields an operator greps for (``saga_id``,
``correlation_id``, ``command`` or ``outcome``) plus one JSON ``body`` with
the rest (docs/redis.md lists it all). A malformed entry is set aside as a
poison record and acknowledged: it never stops a reader.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from engine import metrics
from engine import schema as t
from engine.bus import WORKERS, CommandBus, Entry, read_wait
from engine.decide import Run, begin_attempt, decide, record_failure, record_success, reply_problem
from engine.definition import Saga, StepContext
from engine.errors import ConcurrencyConflict, TransportError, UnknownSaga
from engine.logs import bound
from engine.model import Event, EventKind, Failure, Instance, Transition, idempotency_key
from engine.redis_transport import is_saga_id
from engine.states import ACTIVE_STATES, CompensationStatus, Phase, StepStatus
from engine.store import dumps, has_nul, retry_on_disconnect
from engine.transport import ring

if TYPE_CHECKING:
    from engine.app import SagaEngine

log = logging.getLogger(__name__)

#: Version of the field layout of commands and replies.
WIRE_VERSION = "1"


#: Step indexes and attempt numbers are INTEGER columns.
_INT32 = 2**31 - 1


class BadMessage(ValueError):
    """An entry on a stream is not a well-formed command or reply."""


class Outcome(StrEnum):
    """How a participant says an attempt ended."""

    SUCCESS = "success"
    RETRY = "retry"  # a failure the retry policy may try again
    FAIL = "fail"  # a failure no retry will mend


@dataclass(frozen=True)
class Command:
    """Run one attempt of one side (action or compensation) of a remote step."""

    command: str
    saga_id: str
    saga_name: str
    step: str
    step_index: int
    phase: Phase
    attempt: int
    idempotency_key: str
    correlation_id: str
    business_key: str | None
    deadline_at: int
    sent_at: int
    payload: Any
    outputs: dict[str, Any]
    #: For a compensation: the action's output (None when unknown, e.g. it timed out).
    output: Any = None

    @property
    def service(self) -> str:
        return self.command.split(".", 1)[0]

    def context(self) -> StepContext:
        """What the participant's handler is given: the same as an in-process step's."""
        return StepContext(
            saga_id=self.saga_id,
            saga_name=self.saga_name,
            correlation_id=self.correlation_id,
            business_key=self.business_key,
            payload=self.payload,
            outputs=self.outputs,
            step=self.step,
            phase=self.phase,
            attempt=self.attempt,
            idempotency_key=self.idempotency_key,
        )

    def to_fields(self) -> dict[str, str]:
        body = {
            "saga_name": self.saga_name,
            "step": self.step,
            "step_index": self.step_index,
            "phase": str(self.phase),
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "business_key": self.business_key,
            "deadline_at": self.deadline_at,
            "sent_at": self.sent_at,
            "payload": self.payload,
            "outputs": self.outputs,
            "output": self.output,
        }
        return {
            "v": WIRE_VERSION,
            "command": self.command,
            "saga_id": self.saga_id,
            "correlation_id": self.correlation_id,
            "body": dumps(body),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Command:
        """Parse an entry; raises :class:`BadMessage` saying what is wrong with it."""
        f = _Fields(fields)
        command, saga_id, correlation_id = f.text("command"), f.saga_id(), f.text("correlation_id")
        body = f.body()
        return cls(
            command=command,
            saga_id=saga_id,
            correlation_id=correlation_id,
            saga_name=body.text("saga_name"),
            step=body.text("step"),
            step_index=body.number("step_index", at_most=_INT32),
            phase=body.phase(),
            attempt=body.number("attempt", at_most=_INT32),
            idempotency_key=body.text("idempotency_key"),
            business_key=body.optional_text("business_key"),
            deadline_at=body.number("deadline_at"),
            sent_at=body.number("sent_at"),
            payload=body.get("payload"),
            outputs=body.mapping("outputs"),
            output=body.get("output"),
        )


@dataclass(frozen=True)
class Reply:
    """A participant's answer to one :class:`Command`."""

    saga_id: str
    step: str
    step_index: int
    phase: Phase
    attempt: int
    correlation_id: str
    command: str
    outcome: Outcome
    output: Any = None
    error: str | None = None
    traceback: str | None = None
    #: The participant process that handled it (its consumer name).
    participant: str = ""
    #: When its handler started and ended, epoch ms (0: unknown).
    started_at: int = 0
    finished_at: int = 0

    @classmethod
    def to(cls, command: Command, outcome: Outcome, **fields: Any) -> Reply:
        """The reply to ``command``: its correlation fields, then ``fields``."""
        return cls(
            saga_id=command.saga_id,
            step=command.step,
            step_index=command.step_index,
            phase=command.phase,
            attempt=command.attempt,
            correlation_id=command.correlation_id,
            command=command.command,
            outcome=outcome,
            **fields,
        )

    def to_fields(self) -> dict[str, str]:
        body = {
            "step": self.step,
            "step_index": self.step_index,
            "phase": str(self.phase),
            "attempt": self.attempt,
            "command": self.command,
            "output": self.output,
            "error": self.error,
            "traceback": self.traceback,
            "participant": self.participant,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        return {
            "v": WIRE_VERSION,
            "saga_id": self.saga_id,
            "correlation_id": self.correlation_id,
            "outcome": str(self.outcome),
            "body": dumps(body),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Reply:
        """Parse an entry; raises :class:`BadMessage` saying what is wrong with it."""
        f = _Fields(fields)
        outcome = f.text("outcome")
        if outcome not in Outcome.__members__.values():
            raise BadMessage(f"outcome {outcome[:40]!r} is none of {', '.join(Outcome)}")
        saga_id, correlation_id = f.saga_id(), f.text("correlation_id")
        body = f.body()
        reply = cls(
            saga_id=saga_id,
            correlation_id=correlation_id,
            outcome=Outcome(outcome),
            step=body.text("step"),
            step_index=body.number("step_index", at_most=_INT32),
            phase=body.phase(),
            attempt=body.number("attempt", at_most=_INT32),
            command=body.text("command"),
            output=body.get("output"),
            error=body.optional_text("error"),
            traceback=body.optional_text("traceback"),
            participant=body.optional_text("participant") or "",
            started_at=body.number("started_at", default=0),
            finished_at=body.number("finished_at", default=0),
        )
        if reply.outcome is not Outcome.SUCCESS and not reply.error:
            raise BadMessage(f"a {reply.outcome} reply needs an error")
        return reply

    def failure(self) -> Failure:
        return Failure(
            self.error or "failed", self.traceback, retryable=self.outcome is Outcome.RETRY
        )


class _Fields:
    """Typed access to an entry's raw fields; every problem is a :class:`BadMessage`."""

    def __init__(self, fields: Mapping[bytes, bytes]) -> None:
        self.fields = fields
        version = self.optional("v")
        if version != WIRE_VERSION:
            raise BadMessage(f"wire version {version!r}, this code reads {WIRE_VERSION!r}")

    def optional(self, name: str) -> str | None:
        raw = self.fields.get(name.encode())
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage(f"{name} is not UTF-8 text: {raw[:60]!r}") from None

    def text(self, name: str) -> str:
        value = self.optional(name)
        if not value:
            names = ", ".join(k.decode("utf-8", "replace") for k in self.fields) or "none"
            raise BadMessage(f"no {name} field (fields: {names})")
        return value

    def saga_id(self) -> str:
        value = self.text("saga_id")
        if not is_saga_id(value):
            raise BadMessage(f"saga_id {value[:60]!r} is not a saga id (a UUID)")
        return value.lower()

    def body(self) -> _Body:
        text = self.text("body")
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            raise BadMessage(f"body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadMessage("body is not a JSON object")
        # What the store cannot keep is refused here, where it can be set aside,
        # rather than failing the transaction that records a whole batch.
        if "\\u0000" in text and has_nul(value):
            raise BadMessage("body holds the NUL character (U+0000), which the store cannot keep")
        return _Body(value)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Body:
    """Typed access to the JSON body of an entry."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def optional_text(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is not None and not isinstance(value, str):
            raise BadMessage(f"body.{name} is not text")
        return value

    def text(self, name: str) -> str:
        value = self.optional_text(name)
        if not value:
            raise BadMessage(f"body.{name} is missing")
        return value

    def number(self, name: str, default: int | None = None, *, at_most: int = 2**63 - 1) -> int:
        value = self.values.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadMessage(f"body.{name} {value!r} is not a whole number")
        if not 0 <= value <= at_most:
            raise BadMessage(f"body.{name} {value} is out of range (0 to {at_most})")
        return value

    def phase(self) -> Phase:
        value = self.values.get("phase")
        if not isinstance(value, str) or value not in Phase.__members__.values():
            raise BadMessage(f"body.phase {value!r} is neither action nor compensate")
        return Phase(value)

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.values.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise BadMessage(f"body.{name} is not a JSON object")
        return value


# -- sending commands ----------------------------------------------------------


class Dispatcher:
    """Sends the command of an attempt that was just begun and stored."""

    def __init__(self, bus: CommandBus, clock: Callable[[], int]) -> None:
        self.bus = bus
        self.clock = clock

    def send(self, inst: Instance, index: int, phase: Phase, defn: Saga) -> bool:
        """Send the command for the attempt of step ``index`` in flight; False if Redis is down.

        Call only after the transaction that began the attempt committed. A
        command that cannot be sent is not an error for the caller: the
        attempt times out at its stored deadline and the retry policy applies.
        """
        command = command_for(inst, index, phase, defn, self.clock())
        try:
            self.bus.send(self.bus.commands_stream(command.service), command.to_fields())
        except TransportError as exc:
            log.warning(
                "saga %s: command %s not sent (%s); the attempt times out at its deadline",
                inst.id,
                command.command,
                exc,
                extra={"saga_id": inst.id, "correlation_id": inst.correlation_id},
            )
            return False
        return True

    def send_many(
        self, attempts: Sequence[tuple[Instance, int, Phase, Saga]], acks: Sequence[Entry] = ()
    ) -> int:
        """Send several commands in one round trip; how many went (0 or all).

        ``acks``: replies to acknowledge in the same round trip, once recorded.
        """
        now = self.clock()
        commands = [command_for(inst, i, phase, defn, now) for inst, i, phase, defn in attempts]
        entries = [(self.bus.commands_stream(c.service), c.to_fields()) for c in commands]
        try:
            self.bus.send_and_ack(entries, WORKERS, acks)
        except TransportError as exc:
            # Replies left unacknowledged are taken over later and discarded as repeats.
            log.warning(
                "%d commands not sent (%s); their attempts time out at their deadlines",
                len(commands),
                exc,
            )
            return 0
        return len(commands)


def command_for(inst: Instance, index: int, phase: Phase, defn: Saga, now: int) -> Command:
    """The command for the attempt of step ``index`` in flight in ``inst``."""
    sdef = defn.steps[index]
    assert sdef.remote is not None, f"step {sdef.name!r} is not remote"
    name = sdef.remote.command(phase)
    assert name is not None, f"step {sdef.name!r} has no compensation command"
    step = inst.steps[index]
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    return Command(
        command=name,
        saga_id=inst.id,
        saga_name=inst.saga_name,
        step=step.name,
        step_index=index,
        phase=phase,
        attempt=step.attempts_of(phase),
        idempotency_key=idempotency_key(inst.id, step.name, phase),
        correlation_id=inst.correlation_id,
        business_key=inst.business_key,
        deadline_at=deadline or now,
        sent_at=now,
        payload=inst.payload,
        outputs=inst.outputs(),
        output=step.output if phase is Phase.COMPENSATE else None,
    )


# -- recording replies -----------------------------------------------------------


class Handled(StrEnum):
    """What became of a reply."""

    RECORDED = "recorded"
    DISCARDED = "discarded"  # not for the attempt in flight: noted on the timeline
    UNKNOWN = "unknown"  # no such saga, or no definition for it in this worker


@dataclass(frozen=True)
class _Recorded:
    """A reply recorded in the transaction: what to send or ring once it commits."""

    saved: Instance
    nxt: Run | None
    defn: Saga


class ReplyHandler:
    """Records participants' replies on their instances, many in one transaction."""

    #: How often a reply is recorded again after the instance changed under it.
    CONFLICT_RETRIES = 5

    def __init__(self, engine: SagaEngine) -> None:
        self.engine = engine
        self.dispatcher = Dispatcher(engine.bus, engine.clock)

    def handle(self, reply: Reply) -> Handled:
        """Record ``reply`` if it is for the attempt in flight (see :meth:`handle_batch`)."""
        return self.handle_batch([reply])[0]

    def handle_batch(self, replies: Sequence[Reply], acks: Sequence[Entry] = ()) -> list[Handled]:
        """Record ``replies`` in one transaction, one commit for the lot; what became of each.

        ``acks``, the entries the replies came in, are acknowledged once the
        replies are recorded, with the commands that follow in one round trip.
        If an instance changed under the batch (a worker timed its attempt out
        meanwhile), the batch is rolled back and each reply is handled on its
        own. Raises SQLAlchemyError if the store refused: nothing was written
        and nothing acknowledged, so the replies can be handled again later.
        """
        try:
            return retry_on_disconnect(lambda: self._record_all(replies, acks))
        except ConcurrencyConflict:
            handled = [self._one_by_one(reply) for reply in replies]
            self.dispatcher.send_many((), acks)
            return handled

    def _one_by_one(self, reply: Reply) -> Handled:
        for _ in range(self.CONFLICT_RETRIES):
            try:
                return retry_on_disconnect(lambda: self._record_all([reply], ()))[0]
            except ConcurrencyConflict:
                continue  # the instance moved on meanwhile: look at it again
        log.warning("saga %s: reply kept conflicting; its attempt will time out", reply.saga_id)
        return Handled.DISCARDED

    def _record_all(self, replies: Sequence[Reply], acks: Sequence[Entry]) -> list[Handled]:
        eng = self.engine
        results: list[Handled] = []
        changes: list[tuple[Instance, Transition]] = []
        later: list[tuple[Run | None, Saga]] = []
        with eng.store.transaction() as conn:
            current = eng.store.load_many({r.saga_id for r in replies}, conn)
            now = eng.clock()
            for reply in replies:
                with bound(reply.saga_id, reply.correlation_id):
                    outcome, change = self._record(conn, current, reply, now)
                results.append(outcome)
                if change is not None:
                    inst, transition, nxt, defn = change
                    changes.append((inst, transition))
                    later.append((nxt, defn))
                    # A second reply for the same saga in this batch sees the first.
                    current[reply.saga_id] = replace(transition.instance, version=inst.version + 1)
            saved = eng.store.save_many(changes, eng.owner, conn)
        # The store's save counted the attempts for the metrics (engine.metrics).
        self._after_commit(
            [_Recorded(inst, nxt, defn) for inst, (nxt, defn) in zip(saved, later, strict=True)],
            acks,
        )
        return results

    def _record(
        self, conn: Connection, current: dict[str, Instance], reply: Reply, now: int
    ) -> tuple[Handled, tuple[Instance, Transition, Run | None, Saga] | None]:
        eng = self.engine
        inst = current.get(reply.saga_id)
        if inst is None:
            log.warning("reply for saga %s ignored: no such instance", reply.saga_id)
            return Handled.UNKNOWN, None
        try:
            defn = eng.registry.get(inst.saga_name, inst.saga_version)
        except UnknownSaga as exc:
            log.warning("reply for saga %s ignored: %s", reply.saga_id, exc)
            return Handled.UNKNOWN, None
        problem = reply_problem(inst, reply.step_index, reply.phase, reply.attempt, now)
        if problem is not None:
            eng.store.append_events(inst, [_discarded(inst, reply, problem)], eng.owner, now, conn)
            log.info("saga %s: reply discarded: %s", inst.id, problem)
            return Handled.DISCARDED, None
        transition, nxt = self._next(_outcome(inst, defn, reply, now), defn, now)
        return Handled.RECORDED, (inst, transition, nxt, defn)

    def _next(self, transition: Transition, defn: Saga, now: int) -> tuple[Transition, Run | None]:
        """Begin the next attempt at once when it is remote (no lease is needed to send it)."""
        decision = decide(transition.instance, now, defn)
        if isinstance(decision, Run) and defn.steps[decision.index].remote is not None:
            begun = begin_attempt(transition.instance, defn, decision, now)
            return transition.then(begun), decision
        return transition, None

    def _after_commit(self, recorded: Sequence[_Recorded], acks: Sequence[Entry]) -> None:
        self.dispatcher.send_many(
            [(r.saved, r.nxt.index, r.nxt.phase, r.defn) for r in recorded if r.nxt is not None],
            acks,
        )
        now = self.engine.clock()
        for r in recorded:
            if r.nxt is None and r.saved.state.is_active and (r.saved.next_run_at or 0) <= now:
                ring(self.engine.transport, r.saved.id)  # an in-process step is due: wake a worker


def _outcome(inst: Instance, defn: Saga, reply: Reply, now: int) -> Transition:
    detail: dict[str, Any] = {"participant": reply.participant, "command": reply.command}
    if reply.started_at and reply.finished_at:
        detail["handler_ms"] = reply.finished_at - reply.started_at
    if reply.outcome is Outcome.SUCCESS:
        transition = record_success(inst, defn, now, reply.output)
    else:
        transition = record_failure(inst, defn, now, reply.failure(), random.random())
    first, *rest = transition.events
    noted = replace(first, detail={**(first.detail or {}), **detail})
    return replace(transition, events=(noted, *rest))


def _discarded(inst: Instance, reply: Reply, why: str) -> Event:
    known = 0 <= reply.step_index < len(inst.steps)
    return Event(
        EventKind.RESULT_DISCARDED,
        reply.step_index if known else None,
        reply.phase,
        reply.attempt,
        error=reply.error,
        detail={
            "why": f"late or repeated reply: {why}",
            "reply": str(reply.outcome),
            "participant": reply.participant,
            "command": reply.command,
        },
    )


# -- the worker's reply listener ---------------------------------------------------


class ReplyListener:
    """A thread of a worker that reads replies and has them recorded.

    A reply is acknowledged once recorded (or discarded); one the store could
    not take is tried again after ``retry_seconds`` for as long as the worker
    runs. If the worker dies first, the reply stays pending on Redis and a
    live worker takes it over.
    """

    def __init__(self, engine: SagaEngine, *, batch: int = 64, retry_seconds: float = 0.5) -> None:
        self.engine = engine
        self.bus = engine.bus
        self.handler = ReplyHandler(engine)
        self.batch = batch
        self.retry_seconds = retry_seconds
        self.consumer = engine.owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bus_down = False
        self._groups_seen = self._reply_groups_made()
        self.handled: dict[Handled, int] = dict.fromkeys(Handled, 0)

    def start(self) -> ReplyListener:
        self._thread = threading.Thread(target=self.run, name="saga-replies", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop reading; the reply in hand is finished first. True when stopped in time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            self._handle(self._read())
            self._after_lost_state()

    def _read(self) -> list[Entry]:
        try:
            entries = self.bus.read(
                [self.bus.replies_stream], WORKERS, self.consumer, self.batch, read_wait(self.bus)
            )
        except TransportError as exc:
            if not self._bus_down:
                log.warning("worker %s: replies unreachable: %s", self.consumer, exc)
            self._bus_down = True
            self._stop.wait(self.retry_seconds)
            return []
        if self._bus_down:
            log.info("worker %s: replies reachable again", self.consumer)
            self._bus_down = False
        return entries

    def _handle(self, entries: list[Entry]) -> None:
        """Record a batch of replies, then acknowledge them; malformed ones go to poison."""
        good: list[tuple[Entry, Reply]] = []
        for entry in entries:
            try:
                good.append((entry, Reply.from_fields(entry.fields)))
            except BadMessage as exc:
                self._poison(entry, str(exc))
        kept_at = time.monotonic()
        while good and not self._stop.is_set():
            try:
                outcomes = self.handler.handle_batch(
                    [reply for _, reply in good], [entry for entry, _ in good]
                )
            except SQLAlchemyError as exc:
                if refused_for_its_data(exc):
                    self._isolate(good)
                    return
                # Nothing was written: keep the replies and try again.
                log.warning("store error recording %d replies, retrying: %s", len(good), exc)
                self._stop.wait(self.retry_seconds)
                kept_at = self._keep_if_due([entry for entry, _ in good], kept_at)
                continue
            for outcome in outcomes:
                self.handled[outcome] += 1
            return
        # Stopping with replies unrecorded: they stay pending for another worker.

    def _keep_if_due(self, entries: list[Entry], kept_at: float) -> float:
        # While the store is down this worker holds its replies: other workers
        # must not take them over (each takeover counts towards the redelivery
        # cap, and they could not record them either).
        every = self.bus.keep_every
        if every is None or time.monotonic() - kept_at < every:
            return kept_at
        try:
            self.bus.keep(WORKERS, self.consumer, entries)
        except TransportError as exc:
            log.warning("could not keep %d replies in hand: %s", len(entries), exc)
        return time.monotonic()

    def _isolate(self, batch: list[tuple[Entry, Reply]]) -> None:
        """The store refused the batch for what is in it: record the replies one by one
        and set aside the ones it refuses, so one bad reply never blocks the others."""
        for entry, reply in batch:
            try:
                outcome = self.handler.handle_batch([reply], [entry])
            except SQLAlchemyError as exc:
                if not refused_for_its_data(exc):
                    continue  # stays pending; taken over once the store is back
                self._poison(entry, f"the store refused it: {_first_line(exc)}", "refused")
                continue
            self.handled[outcome[0]] += 1

    def _poison(self, entry: Entry, reason: str, why: str = "malformed") -> None:
        metrics.set_aside(entry.stream, why)
        try:
            self.bus.poison(WORKERS, entry, reason)
        except TransportError as exc:
            log.warning("could not set aside reply %s (%s): %s", entry.id, why, exc)

    def _reply_groups_made(self) -> int:
        return self.bus.groups_created.get(self.bus.replies_stream, 0)

    def _after_lost_state(self) -> None:
        # The reply group had to be made: the first use, or Redis lost its data,
        # commands in flight included. Sending those again is safe: participants
        # run each effect once per key, and a repeated reply is discarded. (Only
        # this group counts: participants sharing the bus make groups of their own.)
        made = self._reply_groups_made()
        if made == self._groups_seen:
            return
        self._groups_seen = made
        try:
            resend_in_flight(self.engine)
        except (SQLAlchemyError, TransportError) as exc:
            log.warning("could not send the commands in flight again: %s", exc)


def refused_for_its_data(exc: SQLAlchemyError) -> bool:
    """True when the store refused what it was given (a value out of range, a broken
    constraint): trying the same again cannot help. Anything else (unreachable, busy,
    a schema behind its code) may pass later, so it is tried again."""
    return isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError)


def _first_line(exc: SQLAlchemyError) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


def resend_in_flight(engine: SagaEngine, *, batch: int = 500) -> int:
    """Send again the command of every remote attempt in flight before its deadline.

    For when the command streams lost their entries (Redis flushed or
    restarted empty). Returns how many were sent.
    """
    remote = _remote_sagas(engine)
    if not remote:
        return 0
    now = engine.clock()
    dispatcher = Dispatcher(engine.bus, engine.clock)
    ids = _waiting_ids(engine, now, remote, batch)
    sent = 0
    for first in range(0, len(ids), batch):
        attempts = []
        for inst in engine.store.load_many(ids[first : first + batch]).values():
            defn = engine.registry.get(inst.saga_name, inst.saga_version)
            flight = in_flight_remote(inst, defn, now)
            if flight is not None:
                attempts.append((inst, flight[0], flight[1], defn))
        sent += dispatcher.send_many(attempts)
    if sent:
        log.info("sent again %d commands whose attempts are in flight", sent)
    return sent


def in_flight_remote(inst: Instance, defn: Saga, now: int) -> tuple[int, Phase] | None:
    """(step index, phase) of a remote attempt in flight before its deadline, if any."""
    if not inst.state.is_active or defn.steps[inst.cursor].remote is None:
        return None
    phase = inst.phase
    step = inst.current
    running = (
        step.status is StepStatus.RUNNING
        if phase is Phase.ACTION
        else step.comp_status is CompensationStatus.RUNNING
    )
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    if running and deadline is not None and deadline > now:
        return inst.cursor, phase
    return None


def _remote_sagas(engine: SagaEngine) -> list[tuple[str, int]]:
    return [(s.name, s.version) for s in engine.registry if any(st.remote for st in s.steps)]


def _waiting_ids(
    engine: SagaEngine, now: int, sagas: list[tuple[str, int]], batch: int
) -> list[str]:
    # An attempt in flight makes its deadline the instance's next_run_at, so
    # they are among the active instances due later, along the due index.
    i, s = t.instances.c, t.steps.c
    running = str(StepStatus.RUNNING)
    query = (
        sa.select(i.id)
        .join(t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step))
        .where(
            i.state.in_([a.value for a in ACTIVE_STATES]),
            i.next_run_at > now,
            sa.tuple_(i.saga_name, i.saga_version).in_(sagas),
            sa.or_(s.status == running, s.comp_status == str(CompensationStatus.RUNNING)),
        )
        .order_by(i.next_run_at)
    )
    ids: list[str] = []
    with engine.store.db.connect() as conn:
        for partition in conn.execution_options(yield_per=batch).execute(query).partitions():
            ids.extend(row.id for row in partition)
    return ids
