"""The sweeps: small, bounded, idempotent passes over the store that keep sagas honest.

- ``dispatch``: an attempt marked running whose worker is gone (its lease
  expired, or its deadline passed with no lease) is settled by the
  executor's own rule (:meth:`Executor.settle`: timed out past its deadline,
  abandoned before it) and its policy applies; due work that no worker
  claimed for ``sweep_redispatch_seconds`` gets its doorbell rung again.
  This is :func:`engine.sweeper.doorbells.recover` on a schedule, in bounded batches.
- ``stuck``: an active instance with no progress (and no operator action)
  for longer than its current step's expected duration plus the saga's
  grace is flagged (``stuck_since`` and a timeline event, in one
  transaction); then the saga's :class:`~engine.definition.StuckPolicy`
  applies: alert only, or a retry or force-compensate by the operator
  ``sweeper``, at most once per stretch without progress. Any later stored
  transition clears the flag.
- ``dead_letters``: each new dead letter is planned: when to retry it, for
  sagas with ``dead_letter_retry``, or never (no policy, or the limit reached),
  and the due ones are retried as an operator would, by ``sweeper`` with the
  reason "automatic dead-letter retry n/N", so the audit log shows them.
- ``retention``: finished instances last changed longer ago than
  ``retention_days`` are deleted with their steps, events and dead letters,
  batch after batch for a tenth of a second a pass; the audit log is kept. Bulk
  dry-run snapshots that expired (an hour old, never confirmed) are deleted too,
  whether or not ``retention_days`` is set.

Each reads at most ``sweep_batch`` rows along a partial index, and each
write re-checks its condition (a free lease under a row lock, a version,
``stuck_since IS NULL``), so running a sweep twice, or two sweepers at once,
acts once. The
scheduler (:mod:`engine.sweeper.scheduler`) also lets only one sweeper run at a time.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from engine import metrics
from engine.collaborators import Collaborators
from engine.decide import settle
from engine.definition import Retry, Saga, StuckPolicy
from engine.errors import ConcurrencyConflict, InvalidTransition, SagaNotFound, UnknownSaga
from engine.model import Transition
from engine.operations import Operations
from engine.origins import Origin
from engine.registry import Registry
from engine.states import SagaState
from engine.store import DeadLetterRef, Overdue, StuckCandidate, StuckMark
from engine.store.bulk import BulkStore
from engine.transport.doorbells import ring

log = logging.getLogger(__name__)

#: The actor of everything the sweeps do, on the timeline and in the audit log.
SWEEPER = "sweeper"
#: Retention deletes batch after batch for about this long per pass, then lets the
#: other sweeps run: each pass stays short, and a backlog drains pass after pass.
RETENTION_BUDGET_SECONDS = 0.1
DAY_MS = 86_400_000

#: The sweeps, in the order a full pass runs them.
SWEEPS = ("dispatch", "stuck", "dead_letters", "retention")

Counts = dict[str, int]


class Sweeps:
    """The sweeps over one engine's store, with its clock."""

    def __init__(self, collaborators: Collaborators) -> None:
        c, settings = collaborators, collaborators.settings
        self.store = c.store
        self.registry = c.registry
        self.transport = c.transport
        self.clock = c.clock
        self.operations = Operations(c.store, c.registry, c.transport, c.clock)
        #: What the audit log records as the origin of this sweeper's own actions.
        self.origin = Origin.sweeper(c.owner)
        self.batch = settings.sweep_batch
        self.redispatch_ms = int(settings.sweep_redispatch_seconds * 1000)
        self.retention_days = settings.retention_days
        self._rand = random.Random()

    def run_all(self) -> dict[str, Counts]:
        """One full pass: every sweep once, in :data:`SWEEPS` order."""
        return {name: self.run(name) for name in SWEEPS}

    def run(self, name: str) -> Counts:
        """Run the sweep ``name``, timing it and counting what it did."""
        sweep: Callable[[], Counts] = getattr(self, name)
        started = time.perf_counter()
        try:
            counts = sweep()
        except Exception:
            metrics.SWEEP_ERRORS.labels(name).inc()
            raise
        finally:
            metrics.SWEEP_DURATION.labels(name).observe(time.perf_counter() - started)
        done = {action: n for action, n in counts.items() if n}
        for action, n in done.items():
            metrics.SWEEP_ACTIONS.labels(name, action).inc(n)
        if done:
            log.info("sweep %s: %s", name, ", ".join(f"{a} {n}" for a, n in done.items()))
        return counts

    # -- overdue deadlines, expired leases, lost doorbells ---------------------------

    def dispatch(self) -> Counts:
        """Settle attempts whose worker is gone; ring again for work nobody claimed."""
        now = self.clock()
        counts = {"settled": 0, "leases_cleared": 0, "rung": 0}
        seen: set[str] = set()
        for found in self.store.sweeps.expired_leases(now, self.batch):
            seen.add(found.id)
            self._redispatch(found, now, counts, expired=True)
        for found in self.store.sweeps.overdue(now, now - self.redispatch_ms, self.batch):
            if found.id not in seen:
                self._redispatch(found, now, counts, expired=False)
        return counts

    def _redispatch(self, found: Overdue, now: int, counts: Counts, *, expired: bool) -> None:
        if found.in_flight:
            counts["settled"] += self._settle(found, now)
        elif expired and self.store.clear_expired_lease(found.id, now):
            # A worker claimed it and died before starting anything: nothing to record.
            counts["leases_cleared"] += 1
        counts["rung"] += ring(self.transport, found.id)

    def _settle(self, found: Overdue, now: int) -> bool:
        try:
            defn = self.registry.get(found.saga_name, found.saga_version)
        except UnknownSaga:
            return False  # a worker that knows the saga settles it when it claims it
        rand = self._rand.random()
        saved = self.store.settle_if_free(
            found.id, now, SWEEPER, lambda inst: settle(Transition(inst), defn, now, rand)
        )
        # None: a worker took it meanwhile, it finished, or there was nothing to record.
        return saved is not None

    # -- stuck detection ----------------------------------------------------------

    def stuck(self) -> Counts:
        """Flag instances that stopped progressing, then apply each saga's stuck policy."""
        now = self.clock()
        # First the flags lifted since the last pass, so the timeline says when an
        # instance got going again (before it could be flagged anew).
        cleared = self.store.sweeps.note_stuck_cleared(now, SWEEPER, self.batch)
        found = self.store.sweeps.stuck_candidates(now, stuck_rules(self.registry), self.batch)
        marks = [self._mark(candidate, now) for candidate in found]
        flagged = set(self.store.sweeps.mark_stuck(marks, now, SWEEPER))
        counts = {"flagged": len(flagged), "retried": 0, "compensated": 0, "cleared": cleared}
        for mark in marks:
            if mark.candidate.id in flagged:
                done = self._apply_policy(mark)
                if done is not None:
                    counts[done] += 1
        if counts["retried"] or counts["compensated"]:
            # The policy's own action lifted those flags: say so now, not a pass later.
            counts["cleared"] += self.store.sweeps.note_stuck_cleared(now, SWEEPER, self.batch)
        return counts

    def _mark(self, found: StuckCandidate, now: int) -> StuckMark:
        defn = self.registry.get(found.saga_name, found.saga_version)
        allowed = defn.stuck_after(found.current_step)
        policy = defn.stuck_policy
        action = str(policy)
        # Once per stretch without progress: a retry that did not help is not
        # repeated every pass; the flag stays for a person to look at.
        if policy is not StuckPolicy.ALERT and self.store.sweeps.acted_since(
            found.id, found.last_progress_at
        ):
            action = "none (the sweeper already acted since the last progress)"
        elif policy is StuckPolicy.ALERT:
            action = "none"
        detail = {
            "why": f"no progress for {_span(now - found.last_progress_at)}, "
            f"over the {_span(_ms(allowed))} its step {defn.steps[found.current_step].name!r} "
            "is allowed (expected duration plus grace)",
            "no_progress_since": found.last_progress_at,
            "allowed_ms": _ms(allowed),
            "policy": str(policy),
            "action": action,
        }
        return StuckMark(found, defn.steps[found.current_step].name, detail)

    def _apply_policy(self, mark: StuckMark) -> str | None:
        action = mark.detail["action"]
        if action not in (StuckPolicy.RETRY, StuckPolicy.COMPENSATE):
            return None
        found = mark.candidate
        since = _when(found.last_progress_at)
        reason = f"stuck: no progress since {since}; the saga's stuck policy is {action}"
        act = self.operations.retry if action == StuckPolicy.RETRY else self.operations.compensate
        try:
            act(
                found.id,
                actor=SWEEPER,
                reason=reason,
                expected_version=found.version,
                origin=self.origin,
            )
        except (InvalidTransition, ConcurrencyConflict, SagaNotFound) as exc:
            # The state moved on or does not allow it (an attempt still in flight
            # under a live lease): the instance stays flagged for a person.
            log.warning("saga %s: stuck policy %s not applied: %s", found.id, action, exc)
            return None
        return "retried" if action == StuckPolicy.RETRY else "compensated"

    # -- dead-letter auto-retry -----------------------------------------------------

    def dead_letters(self) -> Counts:
        """Plan new dead letters (when to retry them, or never); retry the due ones."""
        policies = dead_letter_policies(self.registry)
        planned = self._plan(policies)
        retried = dropped = 0
        for ref in self.store.sweeps.due_dead_letters(self.clock(), self.batch):
            if self._auto_retry(ref, policies.get(ref.saga_name)):
                retried += 1
            else:
                dropped += 1
        return {"planned": planned, "retried": retried, "dropped": dropped}

    def _plan(self, policies: dict[str, Retry]) -> int:
        # Every new dead letter of a known saga type is planned, those without a policy
        # as "never": the set still to plan stays small, and so does its index.
        refs = self.store.sweeps.unplanned_dead_letters(self.registry.names(), self.batch)
        done = self.store.sweeps.automatic_retries({r.saga_id for r in refs})
        plans: list[tuple[int, int, int | None]] = []
        for ref in refs:
            policy, n = policies.get(ref.saga_name), done.get(ref.saga_id, 0)
            at = None
            if policy is not None and n < policy.max_attempts:
                at = ref.created_at + policy.delay_ms(n + 1, self._rand.random())
            plans.append((ref.id, n, at))
        self.store.sweeps.plan_dead_letters(plans)
        return len(plans)

    def _auto_retry(self, ref: DeadLetterRef, policy: Retry | None) -> bool:
        n = (ref.auto_retries or 0) + 1
        try:
            inst = self.store.load(ref.saga_id)
            if policy is None or inst.state is not SagaState.FAILED:
                raise InvalidTransition(
                    ref.saga_id, "retry", inst.state, "no automatic retry applies any more"
                )
            self.operations.retry(
                inst.id,
                actor=SWEEPER,
                reason=f"automatic dead-letter retry {n}/{policy.max_attempts}",
                expected_version=inst.version,
                origin=self.origin,
            )
        except (SagaNotFound, UnknownSaga, InvalidTransition, ConcurrencyConflict) as exc:
            # It changed since it was planned (an operator acted, the saga type
            # or its policy went away): leave it to a person from now on.
            log.info("saga %s: automatic dead-letter retry dropped: %s", ref.saga_id, exc)
            self.store.sweeps.drop_auto_retry(ref.id)
            return False
        return True

    # -- retention ------------------------------------------------------------------

    def retention(self) -> Counts:
        """Purge finished instances older than ``retention_days``, for a short while a pass,
        and the bulk dry-run snapshots that expired."""
        snapshots = BulkStore(self.store.db).purge_snapshots(self.clock())
        if self.retention_days is None:
            return {"purged": 0, "snapshots": snapshots}
        before = self.clock() - int(self.retention_days * DAY_MS)
        give_up = time.monotonic() + RETENTION_BUDGET_SECONDS
        purged = 0
        while True:
            n = self.store.sweeps.purge_finished(before, self.batch)
            purged += n
            if n < self.batch or time.monotonic() >= give_up:
                return {"purged": purged, "snapshots": snapshots}


def stuck_rules(registry: Registry) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """(threshold in ms, the (saga, version, step index) it applies to), shortest first."""
    by_threshold: dict[int, list[tuple[str, int, int]]] = {}
    for saga in registry:
        for index in range(len(saga.steps)):
            by_threshold.setdefault(_ms(saga.stuck_after(index)), []).append(
                (saga.name, saga.version, index)
            )
    return sorted(by_threshold.items())


def dead_letter_policies(registry: Registry) -> dict[str, Retry]:
    """Saga type -> automatic dead-letter retry policy (its newest version's), where set."""
    newest: list[Saga] = [registry.latest(name) for name in registry.names()]
    return {s.name: s.dead_letter_retry for s in newest if s.dead_letter_retry is not None}


def _ms(span: timedelta) -> int:
    return int(span.total_seconds() * 1000)


def _span(ms: int) -> str:
    seconds = max(ms, 0) // 1000
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
