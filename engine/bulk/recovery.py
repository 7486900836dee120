"""Bulk recovery: one operator action over every instance a filter matches, paced and stoppable.

The flow, for the console and ``saga bulk`` alike:

1. :meth:`BulkRecovery.dry_run` counts the instances a :class:`BulkFilter`
   matches, shows a sample, with whether the action applies to each, and keeps
   what it previewed (ids and versions) as a *snapshot* under a token, for an
   hour (:data:`SNAPSHOT_TTL_MS`). It changes no instance.
2. :meth:`BulkRecovery.confirm` makes the operation from that snapshot, in one
   transaction: its items are exactly the instances the dry run previewed, at
   the versions it saw; instances that match now on top of them are counted
   (``more_matching``), left alone, and offered for another run. The snapshot
   is used up. (:meth:`BulkRecovery.create`, for ``saga bulk run --expect N``,
   snapshots at confirmation instead, refusing with :class:`SelectionChanged`
   when the count is not the one the operator confirmed.)
3. A :class:`BulkRunner` works through the items in batches at a rate
   limit. Each item goes through the operations API, with the operator as
   actor, the bulk reason, and the version the snapshot saw, so an instance
   that moved on since is skipped, never acted on blind. Between items it
   checks the stop flag in the store, so a stop works from any process.
4. Each applied item is followed until its instance ends
   (:mod:`engine.bulk.follow`): by the runner as it goes, at least every
   second and after each batch, and by every reader of the report
   (:meth:`BulkRecovery.follow`) afterwards. The runner halts itself when the
   share of items with a final outcome that failed passes the threshold.

Everything lives in the store (``saga_bulk_operations`` and
``saga_bulk_items``): the report survives restarts, and a run whose process
died shows as interrupted and can be resumed by any process. Each item's
action is also in the audit log: the applied action's own entry, or a
``bulk_not_applied`` note saying why it was not applied.

What each outcome and result means, and when an item's outcome is final, is
defined in :mod:`engine.bulk.model`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from engine import interventions
from engine.bulk.follow import Follower
from engine.bulk.model import (
    MAX_BATCH,
    MAX_BULK_REASON,
    MAX_ITEMS,
    MAX_RATE,
    MIN_RATE,
    SAMPLE_SIZE,
    SNAPSHOT_TTL_MS,
    BulkFilter,
    BulkOperation,
    BulkStatus,
    DryRun,
    SampleItem,
)
from engine.bulk.runner import BulkRunner
from engine.collaborators import Collaborators
from engine.errors import (
    InvalidInput,
    InvalidTransition,
    SagaNotFound,
    UnknownSaga,
)
from engine.inputs import MAX_KEY, check_id, check_text
from engine.interventions import Action
from engine.model import new_id
from engine.operations import Operations
from engine.origins import IN_PROCESS, Origin
from engine.states import side_in_play
from engine.store.bulk import BulkStore

log = logging.getLogger(__name__)


# -- the facade ------------------------------------------------------------------


class BulkRecovery:
    """Dry runs, creating, running, stopping and reading bulk operations on one engine."""

    def __init__(self, collaborators: Collaborators) -> None:
        c = collaborators
        self.instances = c.store
        self.registry = c.registry
        self.clock = c.clock
        self.owner = c.owner
        self.operations = Operations(c.store, c.registry, c.transport, c.clock)
        self.store = BulkStore(c.store.db)

    def dry_run(self, action: Action, flt: BulkFilter, sample_size: int = SAMPLE_SIZE) -> DryRun:
        """How many instances ``flt`` matches, and the first ``sample_size``; keeps them as a
        snapshot that :meth:`confirm` acts on. Changes no instance."""
        count = self.store.count(flt)
        if count == 0 or count > MAX_ITEMS:
            return DryRun(action, flt, min(count, MAX_ITEMS), count > MAX_ITEMS)
        now = self.clock()
        token = str(uuid.uuid4())
        count = self.store.snapshot(token, action, flt, now, SNAPSHOT_TTL_MS)
        rows = self.store.snapshot_sample(token, sample_size)
        sample = [self._sample_item(action, r) for r in rows]
        return DryRun(action, flt, count, False, sample, token, now + SNAPSHOT_TTL_MS)

    def confirm(
        self,
        action: Action,
        snapshot: str,
        *,
        actor: str,
        reason: str,
        batch_size: int = 50,
        rate_per_second: float = 5.0,
        max_failure_rate: float = 0.2,
        origin: Origin = IN_PROCESS,
    ) -> BulkOperation:
        """Make an operation of exactly the instances dry run ``snapshot`` previewed (not
        started: see :meth:`run`); SnapshotGone when it expired or was confirmed already.
        ``origin`` is kept as :meth:`create` keeps it."""
        _check(action, reason, actor, batch_size, rate_per_second, max_failure_rate)
        limits = (batch_size, rate_per_second, max_failure_rate)
        op = self._new(action, None, actor, reason, limits, origin)
        self.store.insert_from_snapshot(op, snapshot, op["created_at"])
        done = self.store.get(op["id"])
        log.info("bulk %s: %s on %d instances, by %s", done.id, action, done.total, actor)
        return done

    def create(
        self,
        action: Action,
        flt: BulkFilter,
        *,
        actor: str,
        reason: str,
        expected_count: int,
        batch_size: int = 50,
        rate_per_second: float = 5.0,
        max_failure_rate: float = 0.2,
        origin: Origin = IN_PROCESS,
    ) -> BulkOperation:
        """Snapshot the matching instances as a new operation (not started: see :meth:`run`).

        ``origin``, the door the request came through, is kept with the
        operation and recorded with every item's audit entry.
        """
        _check(action, reason, actor, batch_size, rate_per_second, max_failure_rate)
        if expected_count < 1:
            raise InvalidInput("expected count", "the dry run matched no instances: nothing to do")
        limits = (batch_size, rate_per_second, max_failure_rate)
        op = self._new(action, flt, actor, reason, limits, origin)
        self.store.insert(op, flt, expected_count)
        log.info("bulk %s: %s on %d instances, by %s", op["id"], action, expected_count, actor)
        return self.store.get(op["id"])

    def _new(
        self,
        action: Action,
        flt: BulkFilter | None,
        actor: str,
        reason: str,
        limits: tuple[int, float, float],
        origin: Origin,
    ) -> dict[str, Any]:
        """The row of a new operation (the snapshot's filter goes in when ``flt`` is None);
        ``limits``: batch size, rate per second, max failure rate."""
        batch_size, rate_per_second, max_failure_rate = limits
        now = self.clock()
        return {
            "id": new_id(now),
            "action": str(action),
            "reason": reason.strip(),
            "created_by": actor.strip(),
            "created_at": now,
            "selection": None if flt is None else flt.to_json(),
            "batch_size": batch_size,
            "rate_per_second": float(rate_per_second),
            "max_failure_rate": float(max_failure_rate),
            "status": str(BulkStatus.RUNNING),
            "total": 0,
            "heartbeat_at": now,
            "origin": str(origin.kind),
            "origin_detail": origin.detail,
        }

    def runner(self, **clocks: Any) -> BulkRunner:
        """A runner with an id of its own (host, process, and a random part)."""
        runner_id = f"{self.owner}:bulk:{uuid.uuid4().hex[:8]}"
        return BulkRunner(self.store, self.operations, runner_id, **clocks)

    def run(self, operation_id: str) -> BulkOperation:
        """Run (or resume) the operation in this thread until it ends."""
        return self.runner().run(operation_id)

    def spawn(self, operation_id: str) -> threading.Thread:
        """Run the operation in a background thread of this process; returns the thread."""
        thread = threading.Thread(
            target=self._run_logged,
            args=(operation_id,),
            name=f"saga-bulk-{operation_id[-8:]}",
            daemon=True,
        )
        thread.start()
        return thread

    def stop(self, operation_id: str, by: str) -> BulkOperation:
        """Ask the runner to stop before its next item; an interrupted one stops at once."""
        check_id("operation id", operation_id)
        by = check_text("actor", by, limit=MAX_KEY)
        now = self.clock()
        op = self.store.get(operation_id)
        if not op.is_running:
            raise InvalidTransition(
                operation_id, "stop bulk operation", str(op.status), "it has already ended"
            )
        self.store.request_stop(operation_id, by, now)
        if op.interrupted(now):
            self.store.finish(operation_id, None, BulkStatus.STOPPED, f"stopped by {by}", now)
        return self.store.get(operation_id)

    def get(self, operation_id: str) -> BulkOperation:
        """The operation as stored (see :meth:`follow` for up-to-date results)."""
        check_id("operation id", operation_id)
        return self.store.get(operation_id)

    def follow(self, operation_id: str) -> BulkOperation:
        """Follow the applied items that have not ended yet, then read the operation."""
        self.get(operation_id)  # InvalidInput or BulkNotFound before anything else
        Follower(self.store, self.instances.reads, self.clock).follow(operation_id)
        return self.store.get(operation_id)

    def _run_logged(self, operation_id: str) -> None:
        runner = self.runner()
        try:
            runner.run(operation_id)
        except Exception as exc:
            # A background thread has nobody to raise to: log it with its
            # traceback, and leave the operation resumable, saying why.
            log.exception("bulk %s: the runner failed", operation_id)
            try:
                self.store.release(operation_id, runner.runner_id, f"the runner failed: {exc}")
            except Exception:  # the store is what failed; the log line above says so
                log.exception("bulk %s: could not record the failure", operation_id)

    def _sample_item(self, action: Action, row: Any) -> SampleItem:
        applies, why = self._applies(action, row["id"])
        return SampleItem(
            saga_id=row["id"],
            saga_name=row["saga_name"],
            saga_version=row["saga_version"],
            state=row["state"],
            business_key=row["business_key"],
            step_name=row["step_name"],
            error=row["error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            applies=applies,
            why_not=why,
            phase=str(side_in_play(row["state"], row["comp_status"])),
        )

    def _applies(self, action: Action, saga_id: str) -> tuple[bool | None, str | None]:
        try:
            inst = self.instances.load(saga_id)
            defn = self.registry.get(inst.saga_name, inst.saga_version)
            interventions.apply(action, inst, defn, self.clock())
        except SagaNotFound:
            return False, "it no longer exists"
        except UnknownSaga:
            return None, "this process does not load its saga definition"
        except InvalidTransition as exc:
            return False, exc.why
        return True, None


def _check(
    action: Action,
    reason: str,
    actor: str,
    batch_size: int,
    rate: float,
    max_failure_rate: float,
) -> None:
    if not (reason or "").strip():
        raise InvalidInput("reason", "say why you are doing this; it goes in the audit log")
    if len(reason.strip()) > MAX_BULK_REASON:
        raise InvalidInput("reason", f"is {len(reason)} characters; the limit is {MAX_BULK_REASON}")
    if not (actor or "").strip():
        raise InvalidInput("actor", "name who is acting")
    if not 1 <= batch_size <= MAX_BATCH:
        raise InvalidInput("batch size", f"must be between 1 and {MAX_BATCH}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInput("rate", f"must be between {MIN_RATE} and {MAX_RATE:g} per second")
    if not 0.0 <= max_failure_rate <= 1.0:
        raise InvalidInput("failure threshold", "must be between 0% and 100%")
    Action(action)
