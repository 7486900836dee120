"""Bulk operations and their items in the store (``saga_bulk_operations``, ``saga_bulk_items``).

The snapshot of matching instances, each item's outcome, the runner's claim
and heartbeat, and the stop flag: everything a bulk run needs to survive a
restart and be stopped or resumed from any process.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
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
    SnapshotGone,
)
from engine.errors import (
    InvalidInput,
)
from engine.interventions import Action
from engine.outcomes import Followed, Result
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
    if flt.outside:
        b = t.bulk_items.c
        taken = sa.select(b.saga_id).where(b.operation_id == flt.outside)
        query = query.where(i.id.not_in(taken))
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

    # -- dry-run snapshots ------------------------------------------------------

    def snapshot(self, token: str, action: Action, flt: BulkFilter, now: int, ttl: int) -> int:
        """Keep the instances ``flt`` matches now (ids and versions) as ``token``, for
        ``ttl`` ms; returns how many. Expired snapshots are deleted on the way."""
        s, si = t.bulk_snapshots, t.bulk_snapshot_items
        with self.db.begin() as c:
            _purge_snapshots(c, now)
            c.execute(
                s.insert().values(
                    token=token,
                    action=str(action),
                    selection=flt.to_json(),
                    total=0,
                    created_at=now,
                    expires_at=now + ttl,
                )
            )
            found = _matching(flt).limit(MAX_ITEMS).subquery()
            numbered = sa.select(
                sa.literal(token),
                sa.func.row_number().over(order_by=(found.c.created_at, found.c.id)),
                found.c.id,
                found.c.saga_name,
                found.c.state,
                found.c.version,
            )
            columns = ["token", "seq", "saga_id", "saga_name", "state", "version"]
            c.execute(si.insert().from_select(columns, numbered))
            total = int(
                c.execute(sa.select(sa.func.count()).where(si.c.token == token)).scalar_one()
            )
            c.execute(s.update().where(s.c.token == token).values(total=total))
        return total

    def snapshot_sample(self, token: str, limit: int) -> list[Any]:
        """The first ``limit`` instances of a snapshot as they are now, in its order."""
        si, i, st = t.bulk_snapshot_items.c, t.instances.c, t.steps.c
        query = (
            sa.select(
                i.id,
                i.saga_name,
                i.saga_version,
                i.state,
                i.version,
                i.business_key,
                i.created_at,
                i.updated_at,
                st.name.label("step_name"),
                st.comp_status,
                sa.func.coalesce(st.comp_error, st.error).label("error"),
            )
            .select_from(t.bulk_snapshot_items)
            .join(t.instances, i.id == si.saga_id)
            .join(t.steps, sa.and_(st.saga_id == i.id, st.step_index == i.current_step))
            .where(si.token == token)
            .order_by(si.seq)
            .limit(limit)
        )
        with self.db.connect() as c:
            return list(c.execute(query).mappings())

    def insert_from_snapshot(self, op: dict[str, Any], token: str, now: int) -> None:
        """Store the operation with the snapshot's instances as its items, and how many
        more match its filter now (``more_matching``: left alone); the snapshot is used
        up. SnapshotGone when it expired or was used; nothing is written then."""
        s, si, ops = t.bulk_snapshots, t.bulk_snapshot_items, t.bulk_operations.c
        with self.db.begin() as c:
            snap = (
                c.execute(sa.select(s).where(s.c.token == token, s.c.expires_at > now))
                .mappings()
                .first()
            )
            if snap is None:
                raise SnapshotGone(token)
            if snap["action"] != op["action"]:
                raise InvalidInput("action", f"the dry run you confirmed was for {snap['action']}")
            flt = BulkFilter.from_json(snap["selection"])
            row = {**op, "selection": snap["selection"], "total": snap["total"]}
            c.execute(t.bulk_operations.insert().values(**row))
            taken = sa.select(
                sa.literal(op["id"]),
                si.c.seq,
                si.c.saga_id,
                si.c.saga_name,
                si.c.state,
                si.c.version,
                sa.literal(str(ItemOutcome.PENDING)),
            ).where(si.c.token == token)
            columns = [
                "operation_id",
                "seq",
                "saga_id",
                "saga_name",
                "state_before",
                "version_before",
                "outcome",
            ]
            c.execute(t.bulk_items.insert().from_select(columns, taken))
            c.execute(
                t.bulk_operations.update()
                .where(ops.id == op["id"])
                .values(more_matching=_more_matching(c, flt, token))
            )
            c.execute(si.delete().where(si.c.token == token))
            if c.execute(s.delete().where(s.c.token == token)).rowcount != 1:
                raise SnapshotGone(token)  # another confirmation used it meanwhile

    def purge_snapshots(self, now: int) -> int:
        """Delete the snapshots that expired; returns how many."""
        with self.db.begin() as c:
            return _purge_snapshots(c, now)

    # -- operations and items --------------------------------------------------

    def get(self, operation_id: str) -> BulkOperation:
        """The operation, with its accepted items counted by result."""
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
            results = _results(c, [operation_id])
        return _operation(row, results.get(operation_id, {}))

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
            rows = list(c.execute(query.limit(limit)).mappings())
            results = _results(c, [r["id"] for r in rows])
        return [_operation(r, results.get(r["id"], {})) for r in rows]

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
        followed: tuple[int, Followed] | None = None,
    ) -> None:
        """Store one item's outcome and count it, in one transaction; ``followed``: when
        an accepted action was taken, and what became of the instance so far."""
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
                    acted_at=None if followed is None else followed[0],
                    result=None if followed is None else str(followed[1].result),
                    ended_at=None if followed is None else followed[1].ended_at,
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

    def open_items(self, operation_id: str, after: int, limit: int) -> list[BulkItem]:
        """Applied items not ended yet (the ones a follow pass reads), from seq ``after``."""
        b = t.bulk_items.c
        query = (
            sa.select(t.bulk_items)
            .where(
                b.operation_id == operation_id,
                b.outcome == str(ItemOutcome.APPLIED),
                b.ended_at.is_(None),
                b.seq > after,
            )
            .order_by(b.seq)
            .limit(limit)
        )
        with self.db.connect() as c:
            return [_item(r) for r in c.execute(query).mappings()]

    def settle(self, operation_id: str, found: list[tuple[int, Followed]]) -> tuple[int, int]:
        """Store what became of applied items (by seq), in one transaction; an item that
        failed again moves to that outcome and its counters. Returns how many of them
        ended, and how many of those failed again (items stored already are not counted)."""
        b, ops = t.bulk_items.c, t.bulk_operations.c
        ended = failed = 0
        with self.db.begin() as c:
            for seq, followed in found:
                outcome = ItemOutcome.APPLIED
                if followed.result is Result.FAILED_AGAIN:
                    outcome = ItemOutcome.FAILED_AGAIN
                done = c.execute(
                    t.bulk_items.update()
                    .where(
                        b.operation_id == operation_id,
                        b.seq == seq,
                        b.outcome == str(ItemOutcome.APPLIED),
                        b.ended_at.is_(None),
                    )
                    .values(
                        outcome=str(outcome),
                        result=str(followed.result),
                        ended_at=followed.ended_at,
                        error=followed.by,
                    )
                ).rowcount
                ended += done if followed.is_final else 0
                failed += done if outcome is ItemOutcome.FAILED_AGAIN else 0
            if failed:
                c.execute(
                    t.bulk_operations.update()
                    .where(ops.id == operation_id)
                    .values(applied=ops.applied - failed, failed_again=ops.failed_again + failed)
                )
        return ended, failed

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


def _results(c: Connection, operation_ids: list[str]) -> dict[str, dict[str, int]]:
    """Accepted items by result, per operation, in one query."""
    b = t.bulk_items.c
    query = (
        sa.select(b.operation_id, b.result, sa.func.count())
        .where(b.operation_id.in_(operation_ids), b.result.is_not(None))
        .group_by(b.operation_id, b.result)
    )
    found: dict[str, dict[str, int]] = {}
    for operation_id, result, n in c.execute(query):
        found.setdefault(operation_id, {})[result] = int(n)
    return found


def _operation(row: Any, results: dict[str, int]) -> BulkOperation:
    values = dict(row)
    values.update(
        action=Action(row["action"]),
        status=BulkStatus(row["status"]),
        selection=BulkFilter.from_json(row["selection"]),
        results=results,
    )
    return BulkOperation(**values)


def _item(row: Any) -> BulkItem:
    values = dict(row)
    values["outcome"] = ItemOutcome(row["outcome"])
    values["result"] = None if row["result"] is None else Result(row["result"])
    return BulkItem(**values)


def _more_matching(c: Connection, flt: BulkFilter, token: str) -> int:
    """Instances ``flt`` matches now that snapshot ``token`` does not hold."""
    si = t.bulk_snapshot_items.c
    held = sa.select(si.saga_id).where(si.token == token)
    extra = _matching(flt).where(t.instances.c.id.not_in(held)).limit(MAX_ITEMS).subquery()
    return int(c.execute(sa.select(sa.func.count()).select_from(extra)).scalar_one())


def _purge_snapshots(c: Connection, now: int) -> int:
    s, si = t.bulk_snapshots.c, t.bulk_snapshot_items.c
    expired = sa.select(s.token).where(s.expires_at <= now)
    c.execute(t.bulk_snapshot_items.delete().where(si.token.in_(expired)))
    return int(c.execute(t.bulk_snapshots.delete().where(s.expires_at <= now)).rowcount)


def _too_many() -> InvalidInput:
    return InvalidInput(
        "filter", f"it matches more than {MAX_ITEMS:,} instances; narrow it (one bulk at a time)"
    )
