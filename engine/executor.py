"""Runs one saga instance forward while holding its lease.

The loop is: ask the pure core what to do, run the step, store its outcome
(folded into the same commit as the start of the next attempt), and repeat
until the core says wait or idle. A transactional step's action runs on the
store's connection inside the transaction that records its result.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.collaborators import Clock, Collaborators
from engine.decide import (
    Run,
    begin_attempt,
    decide,
    record_failure,
    record_success,
    settle,
)
from engine.definition import Saga, StepContext
from engine.errors import ConcurrencyConflict, InvalidInput, UnknownSaga
from engine.logs import bound
from engine.model import Event, EventKind, Failure, Instance, Transition, evolve, idempotency_key
from engine.remote.dispatch import Dispatcher
from engine.states import Phase
from engine.store import Store, dumps
from engine.store.connection import Connection

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Step:
    """An attempt this executor began and now runs."""

    run: Run
    defn: Saga


class Executor:
    """Advances instances whose lease ``owner`` holds; safe to share between threads."""

    def __init__(
        self, collaborators: Collaborators, dispatcher: Dispatcher, step_threads: int = 16
    ) -> None:
        self.store = collaborators.store
        self.registry = collaborators.registry
        self.owner = collaborators.owner
        self.clock = collaborators.clock
        #: Sends the commands of remote steps once their attempts are stored.
        self.dispatcher = dispatcher
        self._pool = ThreadPoolExecutor(max_workers=step_threads, thread_name_prefix="saga-step")
        self._rand = random.Random()
        self._lock = threading.Lock()
        self.leases = Heartbeat(self.store, self.owner, collaborators.lease_ms, self.clock)
        self._failures = _FailureRate()
        #: Set when the worker drains: each instance in hand stops after its current step.
        self.draining = threading.Event()

    def shutdown(self) -> None:
        self.leases.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def advance(self, inst: Instance) -> Instance:
        """Run ``inst`` until it finishes, waits, or needs an operator; releases the lease."""
        defn = self._definition(inst)
        if defn is None:
            self.store.release(inst.id, self.owner)
            return inst
        transition, step = self.plan(Transition(inst), defn)
        return self._loop(inst, transition, step, defn)

    def resume(self, inst: Instance, step: _Step) -> Instance:
        """Go on with an attempt already begun and stored (a new inline instance)."""
        return self._loop(inst, Transition(inst), step, step.defn)

    def _loop(
        self, inst: Instance, transition: Transition, step: _Step | None, defn: Saga
    ) -> Instance:
        self.leases.hold(inst.id)
        try:
            while True:
                try:
                    inst = self._store(inst, transition, step)
                    if step is None:
                        return inst
                    inst, transition, step = self._execute(inst, step)
                except ConcurrencyConflict as conflict:
                    inst, transition, step = self._after_conflict(inst, defn, conflict)
        finally:
            self.leases.drop(inst.id)

    def plan(
        self, transition: Transition, defn: Saga, begin: bool = True
    ) -> tuple[Transition, _Step | None]:
        """Extend ``transition`` with the start of whatever attempt is due next (if ``begin``)."""
        now = self.clock()
        transition = self.settle(transition, defn, now)
        decision = decide(transition.instance, now, defn)
        if isinstance(decision, Run) and begin:
            begun = begin_attempt(transition.instance, defn, decision, now)
            return transition.then(begun), _Step(decision, defn)
        return transition, None

    def settle(self, transition: Transition, defn: Saga, now: int) -> Transition:
        """Record the end of an attempt whose worker is gone (:func:`engine.decide.settle`)."""
        return settle(transition, defn, now, self._random())

    def _store(self, inst: Instance, transition: Transition, step: _Step | None) -> Instance:
        # Every change carries at least one event; none means nothing to store.
        if transition.events:
            # A remote attempt is stored with the lease released: its reply may be
            # recorded by any worker, and no thread here waits for it.
            release = step is None or step.defn.steps[step.run.index].remote is not None
            return self.store.save(inst, transition, self.owner, owner=self.owner, release=release)
        if step is None and inst.lease_owner == self.owner:
            self.store.release(inst.id, self.owner)
            return evolve(inst, lease_owner=None, lease_expires_at=None)
        return inst

    def _execute(self, inst: Instance, step: _Step) -> tuple[Instance, Transition, _Step | None]:
        """Run the begun attempt; returns what is left to store and the next attempt."""
        sdef = step.defn.steps[step.run.index]
        if sdef.external:
            return self._hand_off(inst, step)
        if sdef.transactional:
            return self._run_transactional(inst, step)
        outcome = self._run_in_thread(inst, step)
        return (inst, *self._plan_next(self._outcome(inst, step, outcome), step.defn))

    def _plan_next(self, transition: Transition, defn: Saga) -> tuple[Transition, _Step | None]:
        # A draining worker records what it ran and begins nothing more.
        return self.plan(transition, defn, begin=not self.draining.is_set())

    def _hand_off(self, inst: Instance, step: _Step) -> tuple[Instance, Transition, _Step | None]:
        """A remote or waiting attempt was begun and stored: send its command, or take
        its signal if one is stored already; otherwise its outcome comes later."""
        sdef = step.defn.steps[step.run.index]
        if sdef.signal is not None:
            found = self.store.stored_signal(inst.id, sdef.signal)
            if found is not None:
                return (inst, *self._plan_next(self._outcome(inst, step, found.data), step.defn))
        else:
            self.dispatcher.send(inst, step.run.index, step.run.phase, step.defn)
        return inst, Transition(inst), None

    def start_inline(self, transition: Transition, step: _Step) -> Instance:
        """Create a new instance and run it in this thread; returns where it stopped.

        When the first step is transactional, the instance row is inserted in
        the same transaction as the steps' effects, already in the state they
        lead to: a saga of transactional steps commits once.
        """
        if not step.defn.steps[step.run.index].transactional:
            inst, created = self.store.create(transition, self.owner)
            return self.resume(inst, step) if created else inst
        try:
            inst, nxt = self._optimistically(
                step, lambda contain: self._start_in_one_transaction(transition, step, contain)
            )
        except _Duplicate as duplicate:
            return duplicate.instance
        return inst if nxt is None else self._loop(inst, Transition(inst), nxt, step.defn)

    def _start_in_one_transaction(
        self,
        transition: Transition,
        step: _Step,
        contain: _Containment,
    ) -> tuple[Instance, _Step | None]:
        with self.store.transaction() as conn:
            final, nxt = self._run_batch(transition, step, conn, contain)
            if nxt is None:
                final = evolve(
                    final, instance=evolve(final.instance, lease_owner=None, lease_expires_at=None)
                )
            inst, created = self.store.create(final, self.owner, conn=conn)
            if not created:
                raise _Duplicate(inst)  # roll back the effects: the saga already exists
        return inst, nxt

    def _run_transactional(
        self,
        inst: Instance,
        step: _Step,
    ) -> tuple[Instance, Transition, _Step | None]:
        # The actions' writes and the recorded results commit together, so each
        # effect happens exactly once; on any error they roll back together.
        return self._optimistically(
            step, lambda contain: self._run_in_one_transaction(inst, step, contain)
        )

    def _optimistically(self, step: _Step, run: Callable[[_Containment], _T]) -> _T:
        """``run`` with savepoints only around the attempts likely to raise, and
        again with a savepoint around every attempt if another one raised.

        A savepoint costs two statements per attempt, and an attempt that
        raises outside one aborts the whole batch, which then runs again. So
        each attempt goes without one, unless attempts of that step have been
        raising lately (a step that keeps failing, say): those start inside a
        savepoint, and the rest of the batch still commits in one go.
        """
        try:
            return run(_Containment(self._failures.risky(step.defn.name)))
        except _StepRaised:
            return run(_CONTAIN_EVERY_ATTEMPT)

    def _run_in_one_transaction(
        self,
        inst: Instance,
        step: _Step,
        contain: _Containment,
    ) -> tuple[Instance, Transition, _Step | None]:
        with self.store.transaction() as conn:
            transition, nxt = self._run_batch(Transition(inst), step, conn, contain)
            saved = self.store.save(
                inst, transition, self.owner, owner=self.owner, release=nxt is None, conn=conn
            )
        return saved, Transition(saved), nxt

    def _run_batch(
        self, transition: Transition, step: _Step, conn: Connection, contain: _Containment
    ) -> tuple[Transition, _Step | None]:
        """Run transactional attempts back to back on ``conn`` while they are due now.

        An attempt that ``contain`` covers sits in a savepoint, so a failure
        undoes only that attempt and is recorded, and what follows it (a
        retry, the compensations) still commits once. One it does not cover
        aborts the whole batch with :class:`_StepRaised` when it raises; the
        caller then runs the batch again with every attempt covered.
        """
        current = step
        while True:
            inst = transition.instance
            outcome = self._attempt(inst, current, conn, contain)
            transition, nxt = self._plan_next(
                transition.then(self._outcome(inst, current, outcome)), step.defn
            )
            if nxt is None or not nxt.defn.steps[nxt.run.index].transactional:
                return transition, nxt
            current = nxt

    def _attempt(
        self, inst: Instance, step: _Step, conn: Connection, contain: _Containment
    ) -> object:
        run = step.run
        if not contain.covers(run.index, run.phase):
            try:
                output = self._call_transactional(inst, step, conn)
            except _StepRaised:
                self._failures.record(step.defn.name, run.index, run.phase, failed=True)
                raise
            self._failures.record(step.defn.name, run.index, run.phase, failed=False)
            return output
        try:
            with self.store.savepoint(conn):
                output = self._call_transactional(inst, step, conn)
        except _StepRaised as raised:
            self._failures.record(step.defn.name, run.index, run.phase, failed=True)
            return _failure(raised.exc, step)
        self._failures.record(step.defn.name, run.index, run.phase, failed=False)
        return output

    def _call_transactional(self, inst: Instance, step: _Step, conn: Connection) -> Any:
        sdef = step.defn.steps[step.run.index]
        started = time.monotonic()
        try:
            output = self._call(inst, step, conn)
            dumps(output)
        except Exception as exc:
            raise _StepRaised(exc) from exc
        elapsed = time.monotonic() - started
        if elapsed > sdef.timeout.total_seconds():
            raise _StepRaised(
                TimeoutError(
                    f"took {elapsed:.3f}s, over its {sdef.timeout.total_seconds():g}s timeout; "
                    "its writes were rolled back"
                )
            )
        return output

    def _run_in_thread(self, inst: Instance, step: _Step) -> object:
        sdef = step.defn.steps[step.run.index]
        future: Future[Any] = self._pool.submit(self._call, inst, step, None)
        try:
            output = future.result(timeout=sdef.timeout.total_seconds())
        except FutureTimeout:
            future.add_done_callback(lambda f: self._late_result(inst, step, f))
            secs = sdef.timeout.total_seconds()
            return Failure(f"timed out after {secs:g}s", timed_out=True)
        except Exception as exc:
            return _failure(exc, step)
        try:
            dumps(output)
        except InvalidInput as exc:
            return Failure(
                f"step {sdef.name!r} returned a value that is not JSON: {exc.problem}",
                retryable=False,
            )
        return output

    def _call(self, inst: Instance, step: _Step, conn: Connection | None) -> Any:
        sdef = step.defn.steps[step.run.index]
        ctx = self.context(inst, step.run, conn)
        # Every line the step's code logs carries the saga and correlation ids.
        with bound(inst.id, inst.correlation_id):
            if step.run.phase is Phase.ACTION:
                return sdef.action(ctx)
            assert sdef.compensation is not None
            return sdef.compensation(ctx, inst.steps[step.run.index].output)

    def context(self, inst: Instance, run: Run, conn: Connection | None = None) -> StepContext:
        name = inst.steps[run.index].name
        return StepContext(
            saga_id=inst.id,
            saga_name=inst.saga_name,
            correlation_id=inst.correlation_id,
            business_key=inst.business_key,
            payload=inst.payload,
            outputs=inst.outputs(),
            step=name,
            phase=run.phase,
            attempt=run.attempt,
            idempotency_key=idempotency_key(inst.id, name, run.phase),
            connection=conn,
        )

    def _outcome(self, inst: Instance, step: _Step, outcome: object) -> Transition:
        now = self.clock()
        if isinstance(outcome, Failure):
            return record_failure(inst, step.defn, now, outcome, self._random())
        return record_success(inst, step.defn, now, outcome)

    def _after_conflict(
        self,
        inst: Instance,
        defn: Saga,
        conflict: ConcurrencyConflict,
    ) -> tuple[Instance, Transition, _Step | None]:
        # An operator (or, after a lost lease, another worker) changed the
        # instance: what we were about to store is stale. Note it on the
        # timeline, then follow the instance as it now is.
        log.info("saga %s: %s", inst.id, conflict)
        self.store.append_events(
            inst,
            [
                Event(
                    EventKind.RESULT_DISCARDED,
                    inst.cursor,
                    inst.phase,
                    detail={"why": str(conflict)},
                )
            ],
            self.owner,
            self.clock(),
        )
        fresh = self.store.load(inst.id)
        if fresh.lease_owner != self.owner:
            return fresh, Transition(fresh), None
        transition, step = self._plan_next(Transition(fresh), defn)
        return fresh, transition, step

    def _late_result(self, inst: Instance, step: _Step, future: Future[Any]) -> None:
        exc = future.exception()
        outcome = "raised " + repr(exc) if exc else "returned"
        event = Event(
            EventKind.RESULT_DISCARDED,
            step.run.index,
            step.run.phase,
            step.run.attempt,
            detail={"why": f"the attempt {outcome} after its deadline"},
        )
        try:
            self.store.append_events(inst, [event], self.owner, self.clock())
        except Exception:  # the timeline note is best effort; the outcome was already decided
            log.exception("saga %s: could not record a late result", inst.id)

    def _definition(self, inst: Instance) -> Saga | None:
        try:
            return self.registry.get(inst.saga_name, inst.saga_version)
        except UnknownSaga as exc:
            log.error("saga %s: %s; leaving it for a worker that knows it", inst.id, exc)
            return None

    def _random(self) -> float:
        with self._lock:
            return self._rand.random()


class _FailureRate:
    """How often recent attempts of each transactional step raised, per saga type.

    An exponentially weighted average per (saga, step, phase); races between
    threads only blur it, which is harmless for a hint.
    """

    def __init__(self, weight: float = 0.1, threshold: float = 0.3) -> None:
        self.weight = weight
        self.threshold = threshold
        self._rates: dict[str, dict[tuple[int, Phase], float]] = {}
        self._risky: dict[str, frozenset[tuple[int, Phase]]] = {}

    def record(self, saga_name: str, index: int, phase: Phase, failed: bool) -> None:
        rates = self._rates.setdefault(saga_name, {})
        rate = rates.get((index, phase), 0.0)
        rate += self.weight * (float(failed) - rate)
        rates[index, phase] = rate
        was = (index, phase) in self._risky.get(saga_name, frozenset())
        if (rate > self.threshold) != was:  # rebuilt only when a step crosses the line
            self._risky[saga_name] = frozenset(k for k, r in rates.items() if r > self.threshold)

    def risky(self, saga_name: str) -> frozenset[tuple[int, Phase]]:
        """The (step index, phase) of this saga type whose attempts have been raising."""
        return self._risky.get(saga_name, frozenset())


@dataclass(frozen=True)
class _Containment:
    """Which attempts of a transactional batch run inside a savepoint."""

    risky: frozenset[tuple[int, Phase]] = frozenset()
    every_attempt: bool = False

    def covers(self, index: int, phase: Phase) -> bool:
        return self.every_attempt or (index, phase) in self.risky


_CONTAIN_EVERY_ATTEMPT = _Containment(every_attempt=True)


class _StepRaised(Exception):
    """A transactional step raised: its transaction (or savepoint) must roll back."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class _Duplicate(Exception):
    """The idempotency key named an existing instance: undo this transaction."""

    def __init__(self, instance: Instance) -> None:
        super().__init__(instance.id)
        self.instance = instance


def _failure(exc: BaseException, step: _Step) -> Failure:
    sdef = step.defn.steps[step.run.index]
    policy = sdef.retry if step.run.phase is Phase.ACTION else sdef.compensation_retry
    text = f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(exc))
    # Bad input (such as an output that is not JSON) never gets better by retrying.
    retryable = policy.is_retryable(exc) and not isinstance(exc, InvalidInput)
    return Failure(text, tb, retryable=retryable)


class Heartbeat:
    """Keeps the leases of the instances being advanced alive while steps run long."""

    def __init__(self, store: Store, owner: str, lease_ms: int, clock: Clock) -> None:
        self.store = store
        self.owner = owner
        self.lease_ms = lease_ms
        self.clock = clock
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, saga_id: str) -> None:
        with self._lock:
            self._held[saga_id] = self._held.get(saga_id, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, name="saga-heartbeat", daemon=True
                )
                self._thread.start()

    def drop(self, saga_id: str) -> None:
        with self._lock:
            left = self._held.get(saga_id, 0) - 1
            if left > 0:
                self._held[saga_id] = left
            else:
                self._held.pop(saga_id, None)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        interval = self.lease_ms / 3000
        while not self._stop.wait(interval):
            ids = self.held()
            if not ids:
                continue
            try:
                self.store.renew(self.owner, ids, self.lease_ms, self.clock())
            except Exception:  # a missed beat is retried next interval; the lease has slack
                log.exception("lease heartbeat failed for %d instances", len(ids))
