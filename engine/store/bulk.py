"""Bulk operations and their items in the store (``saga_bulk_operations``, ``saga_bulk_items``).

The snapshot of matching instances, each item's outcome, the runner's claim
and heartbeat, and the stop flag: everything a bulk run needs to survive a
restart and be stopped or resumed from any process.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine as SAEngine

from engine.bulk.model import (
    MAX_ITEMS,
    BulkFilter,
    BulkItem,
    BulkNotFound,
    BulkOperation,
    BulkStatus,
    Control,
    ItemOutcome,
    ItemPage,
    SelectionChanged,
)
from engine.errors import (
    InvalidInput,
)
from engine.interventions import Action
from engine.states import SagaState
from engine.store import schema as t

# -- SQL -------------------------------------------------------------------------


def _matching(flt: BulkFilter) -> sa.Select[Any]:
    """Instances matching ``flt`` with their current step, in the order they are processed."""
    i, s = t.instances.c, t.steps.c
    query = sa.select(
        i.id,
        i.saga_name,
        i.saga_version,
        i.state,
        i.version,
        i.business_key,
        i.created_at,
        i.updated_at,
        s.name.label("step_name"),
        s.comp_status,
        sa.func.coalesce(s.comp_error, s.error).label("error"),
    ).join(t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step))
    if flt.saga_name:
        query = query.where(i.saga_name == flt.saga_name)
    if flt.state is not None:
        query = query.where(i.state == str(flt.state))
    if flt.stuck:
        query = query.where(i.stuck_since.is_not(None))
    if flt.step_name:
        query = query.where(s.name == flt.step_name)
    if flt.error_text:
        text = flt.error_text
        query = query.where(
            sa.or_(
                s.error.icontains(text, autoescape=True),
                s.comp_error.icontains(text, autoescape=True),
            )
        )
    column = i.created_at if flt.time_field == "created" else i.updated_at
    if flt.time_from is not None:
        query = query.where(column >= flt.time_from)
    if flt.time_to is not None:
        query = query.where(column < flt.time_to)
    return query.order_by(i.created_at, i.id)


class BulkStore:
    """Reads and writes ``saga_bulk_operations`` and ``saga_bulk_items``."""

    def __init__(self, db: SAEngine) -> None:
        self.db = db

    def count(self, flt: BulkFilter, cap: int = MAX_ITEMS) -> int:
        """How many instances match, counting at most ``cap + 1``."""
        limited = _matching(flt).limit(cap + 1).subquery()
        with self.db.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(limited)).scalar_one())

    def sample(self, flt: BulkFilter, limit: int) -> list[Any]:
        with self.db.connect() as c:
            return list(c.execute(_matching(flt).limit(limit)).mappings())

    def insert(self, op: dict[str, Any], flt: BulkFilter, expected: int) -> None:
        """Store the operation and snapshot its items; SelectionChanged rolls both back."""
        with self.db.begin() as c:
            c.execute(t.bulk_operations.insert().values(**op))
            found = _matching(flt).limit(MAX_ITEMS + 1).subquery()
            numbered = sa.select(
                sa.literal(op["id"]),
                sa.func.row_number().over(order_by=(found.c.created_at, found.c.id)),
                found.c.id,
                found.c.saga_name,
                found.c.state,
                found.c.version,
                sa.literal(str(ItemOutcome.PENDING)),
            )
            columns = [
                "operation_id",
                "seq",
                "saga_id",
                "saga_name",
                "state_before",
                "version_before",
                "outcome",
            ]
            c.execute(t.bulk_items.insert().from_select(columns, numbered))
            b = t.bulk_items.c
            total = int(
                c.execute(sa.select(sa.func.count()).where(b.operation_id == op["id"])).scalar_one()
            )
            if total > MAX_ITEMS:
                raise _too_many()
            if total != expected:
                raise SelectionChanged(expected, total)
            ops = t.bulk_operations.c
            c.execute(t.bulk_operations.update().where(ops.id == op["id"]).values(total=total))

    def get(self, operation_id: str) -> BulkOperation:
        with self.db.connect() as c:
            row = (
                c.execute(
                    sa.select(t.bulk_operations).where(t.bulk_operations.c.id == operation_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise BulkNotFound(operation_id)
        return _operation(row)

    def recent(self, limit: int = 50, before: str | None = None) -> list[BulkOperation]:
        """Operations, newest first; ``before`` is the id of the last one of the previous page."""
        ops = t.bulk_operations.c
        query = sa.select(t.bulk_operations).order_by(ops.created_at.desc(), ops.id.desc())
        if before:
            last = self.get(before)
            query = query.where(
                sa.tuple_(ops.created_at, ops.id) < sa.tuple_(last.created_at, last.id)
            )
        with self.db.connect() as c:
            return [_operation(r) for r in c.execute(query.limit(limit)).mappings()]

    def items(
        self,
        operation_id: str,
        *,
        outcome: ItemOutcome | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> ItemPage:
        """Items in processing order, from ``after`` (a seq), optionally of one outcome."""
        b, i = t.bulk_items.c, t.instances.c
        query = (
            sa.select(t.bulk_items, i.state.label("state_now"))
            .outerjoin(t.instances, i.id == b.saga_id)
            .where(b.operation_id == operation_id, b.seq > after)
            .order_by(b.seq)
            .limit(limit + 1)
        )
        if outcome is not None:
            query = query.where(b.outcome == str(outcome))
        with self.db.connect() as c:
            rows = [_item(r) for r in c.execute(query).mappings()]
        more = len(rows) > limit
        return ItemPage(rows[:limit], rows[limit - 1].seq if more else None)

    def claim(self, operation_id: str, runner: str, now: int) -> BulkOperation | None:
        """Become the runner of a running operation nobody (alive) runs; None if taken."""
        op = self.get(operation_id)
        if not op.is_running:
            return None
        ops = t.bulk_operations.c
        stale = now - op.stale_after_ms
        with self.db.begin() as c:
            taken = c.execute(
                t.bulk_operations.update()
                .where(
                    ops.id == operation_id,
                    ops.status == str(BulkStatus.RUNNING),
                    sa.or_(ops.runner.is_(None), ops.heartbeat_at < stale),
                )
                .values(
                    runner=runner,
                    heartbeat_at=now,
                    started_at=sa.func.coalesce(ops.started_at, now),
                )
            ).rowcount
        return self.get(operation_id) if taken == 1 else None

    def beat(self, operation_id: str, runner: str, now: int) -> Control:
        """Report that ``runner`` is alive; learn whether it must stop."""
        ops = t.bulk_operations.c
        with self.db.begin() as c:
            mine = c.execute(
                t.bulk_operations.update()
                .where(
                    ops.id == operation_id,
                    ops.runner == runner,
                    ops.status == str(BulkStatus.RUNNING),
                )
                .values(heartbeat_at=now)
            ).rowcount
            stop_by = c.execute(
                sa.select(ops.stop_requested_by).where(
                    ops.id == operation_id, ops.stop_requested_at.is_not(None)
                )
            ).scalar()
        return Control(lost=mine != 1, stop_by=stop_by)

    def pending(self, operation_id: str, limit: int) -> list[BulkItem]:
        return self.items(operation_id, outcome=ItemOutcome.PENDING, limit=limit).items

    def record(
        self,
        item: BulkItem,
        outcome: ItemOutcome,
        now: int,
        *,
        state_after: str | None = None,
        version_after: int | None = None,
        error: str | None = None,
    ) -> None:
        """Store one item's outcome and count it, in one transaction."""
        b, ops = t.bulk_items.c, t.bulk_operations.c
        with self.db.begin() as c:
            done = c.execute(
                t.bulk_items.update()
                .where(
                    b.operation_id == item.operation_id,
                    b.seq == item.seq,
                    b.outcome == str(ItemOutcome.PENDING),
                )
                .values(
                    outcome=str(outcome),
                    state_after=state_after,
                    version_after=version_after,
                    error=error,
                    processed_at=now,
                )
            ).rowcount
            if done != 1:
                return  # recorded already (a resumed run): count it once
            counter = _COUNTERS[outcome]
            c.execute(
                t.bulk_operations.update()
                .where(ops.id == item.operation_id)
                .values({"processed": ops.processed + 1, counter: ops[counter] + 1})
            )

    def mark_failed_again(self, operation_id: str) -> int:
        """Items applied whose instance was dead-lettered since; returns how many were new."""
        b, i, ops = t.bulk_items.c, t.instances.c, t.bulk_operations.c
        again = sa.exists().where(
            i.id == b.saga_id,
            i.state == str(SagaState.FAILED),
            i.version > b.version_after,
        )
        with self.db.begin() as c:
            found = c.execute(
                t.bulk_items.update()
                .where(
                    b.operation_id == operation_id,
                    b.outcome == str(ItemOutcome.APPLIED),
                    again,
                )
                .values(outcome=str(ItemOutcome.FAILED_AGAIN))
            ).rowcount
            if found:
                c.execute(
                    t.bulk_operations.update()
                    .where(ops.id == operation_id)
                    .values(applied=ops.applied - found, failed_again=ops.failed_again + found)
                )
        return int(found)

    def request_stop(self, operation_id: str, by: str, now: int) -> bool:
        """Raise the stop flag; False when the operation was not running or already asked."""
        ops = t.bulk_operations.c
        with self.db.begin() as c:
            return (
                c.execute(
                    t.bulk_operations.update()
                    .where(
                        ops.id == operation_id,
                        ops.status == str(BulkStatus.RUNNING),
                        ops.stop_requested_at.is_(None),
                    )
                    .values(stop_requested_at=now, stop_requested_by=by)
                ).rowcount
                == 1
            )

    def finish(
        self, operation_id: str, runner: str | None, status: BulkStatus, note: str, now: int
    ) -> None:
        """End a running operation (only its runner may, or anyone when ``runner`` is None)."""
        ops = t.bulk_operations.c
        query = t.bulk_operations.update().where(
            ops.id == operation_id, ops.status == str(BulkStatus.RUNNING)
        )
        if runner is not None:
            query = query.where(ops.runner == runner)
        with self.db.begin() as c:
            c.execute(query.values(status=str(status), finished_at=now, note=note, runner=None))

    def release(self, operation_id: str, runner: str, note: str) -> None:
        """Give up running it (the runner failed); it shows as interrupted and can resume."""
        ops = t.bulk_operations.c
        with self.db.begin() as c:
            c.execute(
                t.bulk_operations.update()
                .where(ops.id == operation_id, ops.runner == runner)
                .values(runner=None, heartbeat_at=0, note=note)
            )


_COUNTERS = {
    ItemOutcome.APPLIED: "applied",
    ItemOutcome.SKIPPED: "skipped",
    ItemOutcome.ERROR: "errors",
    ItemOutcome.FAILED_AGAIN: "failed_again",
}


def _operation(row: Any) -> BulkOperation:
    values = dict(row)
    values.update(
        action=Action(row["action"]),
        status=BulkStatus(row["status"]),
        selection=BulkFilter.from_json(row["selection"]),
    )
    return BulkOperation(**values)


def _item(row: Any) -> BulkItem:
    values = dict(row)
    values["outcome"] = ItemOutcome(row["outcome"])
    return BulkItem(**values)


def _too_many() -> InvalidInput:
    return InvalidInput(
        "filter", f"it matches more than {MAX_ITEMS:,} instances; narrow it (one bulk at a time)"
    )
