"""Running a bulk operation: items in batches, at a rate, stoppable, halting on failures."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.bulk.follow import Follower, followed_at_once
from engine.bulk.model import (
    FOLLOW_EVERY,
    MAX_RATE,
    MIN_RATE,
    MIN_SAMPLE,
    BulkItem,
    BulkOperation,
    BulkStatus,
    ItemOutcome,
)
from engine.errors import (
    ConcurrencyConflict,
    InvalidInput,
    InvalidTransition,
    SagaNotFound,
    UnknownSaga,
)
from engine.model import now_ms
from engine.operations import MAX_REASON
from engine.origins import Origin
from engine.store.bulk import BulkStore

if TYPE_CHECKING:
    from engine.operations import Operations

log = logging.getLogger(__name__)


# -- pacing ----------------------------------------------------------------------


class RateLimiter:
    """Spaces calls of :meth:`wait` at least ``1/rate`` seconds apart (no bursts).

    So any window of ``w`` seconds holds at most ``w * rate + 1`` calls. The
    clock and sleep are injected, so tests check the schedule, not the speed.
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not MIN_RATE <= rate <= MAX_RATE:
            raise InvalidInput("rate", f"must be between {MIN_RATE} and {MAX_RATE:g} per second")
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self._next: float | None = None

    def wait(self) -> None:
        """Return at the next free slot, sleeping until then if needed."""
        now = self.clock()
        slot = now if self._next is None else max(self._next, now)
        if slot > now:
            self.sleep(slot - now)
        self._next = slot + self.interval


# -- running ---------------------------------------------------------------------


@dataclass
class _Tally:
    """Items with a final outcome, and the failures among them, as this runner knows them:
    counted as it goes, and read back from the store after each follow pass (readers of
    the report follow too, so the store knows more than this runner saw)."""

    ended: int
    failures: int
    followed_at: float

    def count(self, failed: bool) -> None:
        self.ended += 1
        self.failures += int(failed)

    def read(self, op: BulkOperation) -> None:
        self.ended, self.failures = op.ended, op.failures


class BulkRunner:
    """Works through one operation's items; one runner per operation at a time."""

    def __init__(
        self,
        bulk: BulkStore,
        operations: Operations,
        runner_id: str,
        *,
        now: Callable[[], int] = now_ms,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bulk = bulk
        self.operations = operations
        self.runner_id = runner_id
        self.now = now
        self.monotonic = monotonic
        self.sleep = sleep
        self.follower = Follower(bulk, operations.store.reads, operations.clock)

    def run(self, operation_id: str) -> BulkOperation:
        """Process the pending items until done, stopped, halted or taken over."""
        op = self.bulk.claim(operation_id, self.runner_id, self.now())
        if op is None:
            return self.bulk.get(operation_id)  # finished, or another runner has it
        log.info(
            "bulk %s: %s on %d instances, run by %s", op.id, op.action, op.total, op.created_by
        )
        limiter = RateLimiter(op.rate_per_second, self.monotonic, self.sleep)
        tally = _Tally(op.ended, op.failures, self.monotonic())
        while True:
            batch = self.bulk.pending(op.id, op.batch_size)
            if not batch:
                return self._end(op, BulkStatus.COMPLETED, "every instance was processed")
            for item in batch:
                control = self.bulk.beat(op.id, self.runner_id, self.now())
                if control.lost:
                    log.warning("bulk %s: another runner took over; this one stops", op.id)
                    return self.bulk.get(op.id)
                if control.stop_by is not None:
                    return self._end(op, BulkStatus.STOPPED, f"stopped by {control.stop_by}")
                limiter.wait()
                self._process(op, item, tally)
                if self.monotonic() - tally.followed_at >= FOLLOW_EVERY:
                    self._follow(op, tally)
                if self._too_many_failures(op, tally):
                    return self._halt(op, tally)
            self._follow(op, tally)
            if self._too_many_failures(op, tally):
                return self._halt(op, tally)

    def _follow(self, op: BulkOperation, tally: _Tally) -> None:
        """Bring the applied items' results up to date, and the tally with them."""
        self.follower.follow(op.id)
        tally.read(self.bulk.get(op.id))
        tally.followed_at = self.monotonic()

    def _process(self, op: BulkOperation, item: BulkItem, tally: _Tally) -> None:
        """Apply the action to one item and record its outcome (and count a final one)."""
        reason = op.reason  # the operator's words; the audit detail names the operation
        try:
            inst = self.operations.act(
                op.action,
                item.saga_id,
                actor=op.created_by,
                reason=reason,
                expected_version=item.version_before,
                detail={"bulk_operation": op.id},
                origin=_origin(op),
            )
        except ConcurrencyConflict as exc:
            return self._not_applied(op, item, ItemOutcome.SKIPPED, str(exc), reason, tally)
        except SagaNotFound:
            why = "it no longer exists"
            return self._not_applied(op, item, ItemOutcome.SKIPPED, why, reason, tally)
        except InvalidTransition as exc:
            return self._not_applied(op, item, ItemOutcome.SKIPPED, str(exc), reason, tally)
        except (UnknownSaga, InvalidInput) as exc:
            return self._not_applied(op, item, ItemOutcome.ERROR, str(exc), reason, tally)
        followed = followed_at_once(inst.updated_at, inst.version, str(inst.state))
        self.bulk.record(
            item,
            ItemOutcome.APPLIED,
            self.now(),
            state_after=str(inst.state),
            version_after=inst.version,
            followed=(inst.updated_at, followed),
        )
        if followed.is_final:
            tally.count(failed=followed.result.is_failure)
        return None

    def _not_applied(
        self,
        op: BulkOperation,
        item: BulkItem,
        outcome: ItemOutcome,
        why: str,
        reason: str,
        tally: _Tally,
    ) -> None:
        self.bulk.record(item, outcome, self.now(), error=why)
        tally.count(failed=outcome is ItemOutcome.ERROR)
        detail = {"bulk_operation": op.id, "action": str(op.action), "outcome": str(outcome)}
        # A purged instance has no audit entry to add; the report still has the item.
        with contextlib.suppress(SagaNotFound):
            self.operations.note_not_applied(
                item.saga_id,
                actor=op.created_by,
                reason=f"{reason}: {why}"[:MAX_REASON],
                detail={**detail, "why": why},
                origin=_origin(op),
            )

    def _too_many_failures(self, op: BulkOperation, tally: _Tally) -> bool:
        if tally.ended < MIN_SAMPLE:
            return False
        return tally.failures / tally.ended > op.max_failure_rate

    def _halt(self, op: BulkOperation, tally: _Tally) -> BulkOperation:
        rate = tally.failures / tally.ended
        note = (
            f"halted: {tally.failures} of the {tally.ended} instances with an outcome failed "
            f"({rate:.0%}), over the {op.max_failure_rate:.0%} threshold"
        )
        log.warning("bulk %s: %s", op.id, note)
        return self._end(op, BulkStatus.HALTED, note)

    def _end(self, op: BulkOperation, status: BulkStatus, note: str) -> BulkOperation:
        self.follower.follow(op.id)
        self.bulk.finish(op.id, self.runner_id, status, note, self.now())
        log.info("bulk %s: %s (%s)", op.id, status, note)
        return self.bulk.get(op.id)


def _origin(op: BulkOperation) -> Origin:
    """The origin of the operation's creator, which each item's audit entry carries."""
    return Origin.of(op.origin, op.origin_detail)
