"""Remote steps, the orchestrator's side: send commands, record replies.

A remote step (``saga.remote_step("reserve_hotel", "hotel.reserve", ...)``)
is carried out by a participant service (:mod:`engine.remote.participant`). Its
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

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine import metrics
from engine.collaborators import Collaborators
from engine.decide import Run, begin_attempt, decide, record_failure, record_success, reply_problem
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, TransportError, UnknownSaga
from engine.logs import bound
from engine.model import Event, EventKind, Instance, Transition, evolve
from engine.remote.dispatch import Dispatcher, resend_in_flight
from engine.remote.messages import BadMessage, Outcome, Reply
from engine.store import Connection, StoreError, refused_for_its_data, retry_on_disconnect
from engine.transport.commands import WORKERS, read_wait
from engine.transport.doorbells import ring
from engine.transport.streams import Entry

log = logging.getLogger(__name__)


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

    def __init__(self, collaborators: Collaborators) -> None:
        self.collaborators = collaborators
        self.dispatcher = Dispatcher(collaborators.bus, collaborators.clock)

    def handle(self, reply: Reply) -> Handled:
        """Record ``reply`` if it is for the attempt in flight (see :meth:`handle_batch`)."""
        return self.handle_batch([reply])[0]

    def handle_batch(self, replies: Sequence[Reply], acks: Sequence[Entry] = ()) -> list[Handled]:
        """Record ``replies`` in one transaction, one commit for the lot; what became of each.

        ``acks``, the entries the replies came in, are acknowledged once the
        replies are recorded, with the commands that follow in one round trip.
        If an instance changed under the batch (a worker timed its attempt out
        meanwhile), the batch is rolled back and each reply is handled on its
        own. Raises StoreError if the store refused: nothing was written
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
        c = self.collaborators
        results: list[Handled] = []
        changes: list[tuple[Instance, Transition]] = []
        later: list[tuple[Run | None, Saga]] = []
        with c.store.transaction() as conn:
            current = c.store.load_many({r.saga_id for r in replies}, conn)
            now = c.clock()
            for reply in replies:
                with bound(reply.saga_id, reply.correlation_id):
                    outcome, change = self._record(conn, current, reply, now)
                results.append(outcome)
                if change is not None:
                    inst, transition, nxt, defn = change
                    changes.append((inst, transition))
                    later.append((nxt, defn))
                    # A second reply for the same saga in this batch sees the first.
                    current[reply.saga_id] = evolve(transition.instance, version=inst.version + 1)
            saved = c.store.save_many(changes, c.owner, conn)
        # The store's save counted the attempts for the metrics (engine.metrics).
        self._after_commit(
            [_Recorded(inst, nxt, defn) for inst, (nxt, defn) in zip(saved, later, strict=True)],
            acks,
        )
        return results

    def _record(
        self, conn: Connection, current: dict[str, Instance], reply: Reply, now: int
    ) -> tuple[Handled, tuple[Instance, Transition, Run | None, Saga] | None]:
        c = self.collaborators
        inst = current.get(reply.saga_id)
        if inst is None:
            log.warning("reply for saga %s ignored: no such instance", reply.saga_id)
            return Handled.UNKNOWN, None
        try:
            defn = c.registry.get(inst.saga_name, inst.saga_version)
        except UnknownSaga as exc:
            log.warning("reply for saga %s ignored: %s", reply.saga_id, exc)
            return Handled.UNKNOWN, None
        problem = reply_problem(inst, reply.step_index, reply.phase, reply.attempt, now)
        if problem is not None:
            c.store.append_events(inst, [_discarded(inst, reply, problem)], c.owner, now, conn)
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
        now = self.collaborators.clock()
        for r in recorded:
            if r.nxt is None and r.saved.state.is_active and (r.saved.next_run_at or 0) <= now:
                ring(
                    self.collaborators.transport, r.saved.id
                )  # an in-process step is due: wake a worker


def _outcome(inst: Instance, defn: Saga, reply: Reply, now: int) -> Transition:
    detail: dict[str, Any] = {"participant": reply.participant, "command": reply.command}
    if reply.started_at and reply.finished_at:
        detail["handler_ms"] = reply.finished_at - reply.started_at
    if reply.outcome is Outcome.SUCCESS:
        transition = record_success(inst, defn, now, reply.output)
    else:
        transition = record_failure(inst, defn, now, reply.failure(), random.random())
    first, *rest = transition.events
    noted = evolve(first, detail={**(first.detail or {}), **detail})
    return evolve(transition, events=(noted, *rest))


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

    def __init__(
        self, collaborators: Collaborators, *, batch: int = 64, retry_seconds: float = 0.5
    ) -> None:
        self.collaborators = collaborators
        self.bus = collaborators.bus
        self.handler = ReplyHandler(collaborators)
        self.batch = batch
        self.retry_seconds = retry_seconds
        self.consumer = collaborators.owner
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
            except StoreError as exc:
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
            except StoreError as exc:
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
        # Only attempts begun before the group was made can have lost their command;
        # those begun since sent theirs to the new stream.
        made_at = self.bus.groups_made_at.get(self.bus.replies_stream)
        try:
            resend_in_flight(self.collaborators, begun_before=made_at)
        except (StoreError, TransportError) as exc:
            log.warning("could not send the commands in flight again: %s", exc)


def _first_line(exc: StoreError) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
