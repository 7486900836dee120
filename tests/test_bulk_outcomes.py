"""Honest outcomes for operator actions, in bulk and one at a time (issue 12).

An applied item only says the action was accepted: the report follows each one,
with real worker threads, until its instance ends, and says so (completed,
failed again...), in the engine, in ``saga bulk show`` and its JSON; the failure
threshold halts a run on those followed outcomes, in the middle of a batch.
Following reads the instances in batches: the number of statements does not
grow with the number of items. A confirmation acts on exactly what its dry run
previewed, even while new dead letters keep arriving, and reports the extra;
a snapshot is used once and expires after an hour.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from engine import Action, SagaEngine, SagaState
from engine.bulk.model import (
    MIN_SAMPLE,
    SNAPSHOT_TTL_MS,
    BulkFilter,
    BulkStatus,
    ItemOutcome,
    SnapshotGone,
)
from engine.bulk.recovery import BulkRecovery
from engine.cli import main
from engine.outcomes import LaterAction, Trace, follow
from engine.outcomes import Result as Outcome
from engine.queries import Queries
from tests.helpers.engines import Engines, wait_for, wait_state
from tests.test_bulk import (
    FakeClock,
    failed_parcels,
    fix_all,
    gift,
    parcel,
    row_counts,
    stranded,
)


@pytest.fixture
def engine(engines: Engines) -> SagaEngine:
    return engines(parcel, gift)


@pytest.fixture
def saga(store_url: str) -> Callable[..., Result]:
    def invoke(*args: str) -> Result:
        env = {"SAGA_DATABASE_URL": store_url, "SAGA_APP": "", "USER": "tester"}
        return CliRunner().invoke(main, ["-A", "tests.test_bulk", *args], env=env)

    return invoke


@pytest.fixture(autouse=True)
def _carrier_fixed_afterwards() -> Iterator[None]:
    yield
    fix_all()


def confirmed(bulk: BulkRecovery, action: Action = Action.RETRY, **settings: Any) -> str:
    """The id of an operation made from a fresh dry run of the failed parcels."""
    dry = bulk.dry_run(action, failed_parcels())
    assert dry.snapshot is not None
    settings = {"rate_per_second": 1000, **settings}
    return bulk.confirm(action, dry.snapshot, actor="ann", reason="carrier back?", **settings).id


# -- the reported scenario: retries that keep failing -------------------------------------


def test_three_sagas_failing_for_good_are_reported_failed_again_eventually(
    engine: SagaEngine, engines: Engines, saga: Callable[..., Result]
) -> None:
    ids = stranded(engine, 3)  # the carrier is still down: each retry fails again
    bulk = engine.bulk_recovery()
    op_id = confirmed(bulk)

    done = bulk.run(op_id)  # no worker yet: every retry is accepted, none has ended
    assert done.status is BulkStatus.COMPLETED
    assert (done.accepted, done.applied, done.failed_again, done.still_running) == (3, 3, 0, 3)
    assert not done.settled
    engines.worker(engine)

    report = wait_for(lambda: (op := bulk.follow(op_id)).settled and op)

    assert (report.accepted, report.applied, report.failed_again) == (3, 0, 3)
    assert report.results == {"failed_again": 3}
    items = bulk.store.items(op_id).items
    assert [i.saga_id for i in items] == ids
    assert all(i.outcome is ItemOutcome.FAILED_AGAIN and i.final for i in items)
    assert all(i.ended_at and i.acted_at and i.ended_at >= i.acted_at for i in items)
    shown = saga("bulk", "show", op_id)
    assert shown.exit_code == 0, shown.output
    assert "3 applied" in shown.stdout and "3 failed again, 0 still running" in shown.stdout
    assert "settled: yes" in shown.stdout
    doc = json.loads(saga("bulk", "show", op_id, "--json").stdout)
    assert doc["operation"]["results"]["failed_again"] == 3 and doc["operation"]["settled"]
    assert doc["operation"]["accepted"] == 3 and doc["operation"]["applied"] == 0
    assert {(i["outcome"], i["result"], i["final"]) for i in doc["items"]} == {
        ("failed_again", "failed_again", True)
    }


def test_the_threshold_halts_a_run_in_the_middle_of_a_batch(
    engine: SagaEngine, engines: Engines
) -> None:
    ids = stranded(engine, 30)
    engines.worker(engine)
    bulk = engine.bulk_recovery()
    # One batch holds them all: only following during the batch can halt it.
    op_id = confirmed(bulk, batch_size=100, rate_per_second=10, max_failure_rate=0.5)

    def worker_caught_up(n: int) -> None:
        for saga_id in ids[:n]:
            wait_state(engine, saga_id, SagaState.FAILED)

    clock = FakeClock()
    clock.on_sleep = worker_caught_up
    done = bulk.runner(now=clock.now, monotonic=clock.monotonic, sleep=clock.sleep).run(op_id)

    assert done.status is BulkStatus.HALTED
    assert MIN_SAMPLE <= done.ended <= done.processed < 30
    assert done.failures == done.ended  # every one with an outcome had failed again
    assert "over the 50% threshold" in (done.note or "")
    pending = bulk.store.items(op_id, outcome=ItemOutcome.PENDING).items
    assert len(pending) == 30 - done.processed
    assert all(engine.get(i.saga_id).state is SagaState.FAILED for i in pending)


def test_retries_that_go_through_are_followed_to_completed_and_never_halt(
    engine: SagaEngine, engines: Engines
) -> None:
    stranded(engine, 12)
    fix_all()
    engines.worker(engine)
    bulk = engine.bulk_recovery()
    op_id = confirmed(bulk, max_failure_rate=0.0)

    bulk.run(op_id)
    report = wait_for(lambda: (op := bulk.follow(op_id)).settled and op)

    assert report.status is BulkStatus.COMPLETED
    assert report.results == {"completed": 12} and report.failures == 0


def test_following_reads_in_batches_not_once_per_item(engine: SagaEngine) -> None:
    def statements_to_follow(n: int) -> int:
        stranded(engine, n)
        bulk = engine.bulk_recovery()
        op_id = confirmed(bulk)
        bulk.run(op_id)  # no worker: all n stay running, so each look reads all n
        counted: list[str] = []
        listener = lambda *args: counted.append(args[2])  # noqa: E731
        sa.event.listen(engine.store.db, "before_cursor_execute", listener)
        try:
            report = bulk.follow(op_id)
        finally:
            sa.event.remove(engine.store.db, "before_cursor_execute", listener)
        assert report.still_running == n
        for saga_id in (i.saga_id for i in bulk.store.items(op_id).items):
            engine.operations.cancel(saga_id, actor="t", reason="clean up")
        return len(counted)

    assert statements_to_follow(3) == statements_to_follow(40)


# -- a confirmation acts on what its dry run previewed -----------------------------------


def test_a_confirmation_while_dead_letters_keep_arriving_acts_on_the_previewed_ones(
    engine: SagaEngine, store_url: str
) -> None:
    previewed = stranded(engine, 3)
    bulk = engine.bulk_recovery()
    dry = bulk.dry_run(Action.RETRY, failed_parcels())
    assert dry.snapshot is not None and dry.count == 3
    arrived: list[str] = []
    stop = threading.Event()

    def keep_arriving() -> None:
        while not stop.is_set():
            arrived.extend(stranded(engine, 1))

    producer = threading.Thread(target=keep_arriving)
    producer.start()
    try:
        wait_for(lambda: len(arrived) >= 2)
        op = bulk.confirm(Action.RETRY, dry.snapshot, actor="ann", reason="r")
    finally:
        stop.set()
        producer.join(30)

    assert op.total == 3 and 2 <= op.more_matching <= len(arrived)
    done = bulk.runner(sleep=lambda s: None).run(op.id)
    items = bulk.store.items(op.id).items
    assert [i.saga_id for i in items] == previewed
    assert (done.accepted, done.skipped) == (3, 0)
    assert all(engine.get(saga_id).state is SagaState.FAILED for saga_id in arrived)
    with pytest.raises(SnapshotGone):  # used up: a second click starts nothing
        bulk.confirm(Action.RETRY, dry.snapshot, actor="ann", reason="r")
    rest = bulk.dry_run(Action.RETRY, BulkFilter(saga_name="parcel", outside=op.id))
    assert rest.count == len(arrived)
    assert {s.saga_id for s in rest.sample} <= set(arrived)


def test_a_snapshot_expires_after_an_hour_and_the_retention_sweep_deletes_it(
    engine: SagaEngine, store_url: str
) -> None:
    stranded(engine, 2)
    bulk = engine.bulk_recovery()
    dry = bulk.dry_run(Action.CANCEL, failed_parcels())
    assert dry.snapshot is not None
    later = engine.clock() + SNAPSHOT_TTL_MS + 1
    an_hour_on = BulkRecovery(dataclasses.replace(engine.collaborators, clock=lambda: later))
    before = row_counts(store_url)

    with pytest.raises(SnapshotGone):
        an_hour_on.confirm(Action.CANCEL, dry.snapshot, actor="ann", reason="r")

    assert row_counts(store_url) == before
    assert row_counts(store_url, but=set())["saga_bulk_snapshot_items"] == 2
    assert engine.sweeps(clock=lambda: later).retention()["snapshots"] == 1
    counts = row_counts(store_url, but=set())
    assert counts["saga_bulk_snapshots"] == counts["saga_bulk_snapshot_items"] == 0


def test_a_confirmation_for_another_action_than_the_dry_runs_is_refused(
    engine: SagaEngine,
) -> None:
    stranded(engine, 1)
    bulk = engine.bulk_recovery()
    dry = bulk.dry_run(Action.RETRY, failed_parcels())
    assert dry.snapshot is not None
    with pytest.raises(Exception, match="the dry run you confirmed was for retry"):
        bulk.confirm(Action.CANCEL, dry.snapshot, actor="ann", reason="r")


# -- one action at a time ---------------------------------------------------------------


def test_what_became_of_each_single_action_is_answered_from_the_store(
    engine: SagaEngine, engines: Engines
) -> None:
    (saga_id,) = stranded(engine, 1)
    engines.worker(engine)
    queries = Queries(engine.store)

    engine.operations.retry(saga_id, actor="alice", reason="try again")
    wait_for(lambda: queries.action_results(saga_id)[0].followed.is_final)
    fix_all()
    engine.operations.retry(saga_id, actor="bob", reason="carrier fixed")
    wait_state(engine, saga_id, SagaState.COMPLETED)
    bob, alice = queries.action_results(saga_id)

    assert (alice.action.actor, alice.result) == ("alice", Outcome.FAILED_AGAIN)
    assert (bob.action.actor, bob.result) == ("bob", Outcome.COMPLETED)
    assert alice.action.at <= (alice.followed.ended_at or 0) <= bob.action.at
    assert bob.to_json()["result"] == "completed" and bob.to_json()["final"]


# -- the pure rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trace", "expected"),
    [
        (Trace("running", 150), (Outcome.RUNNING, None, None)),
        (Trace("compensating", 150), (Outcome.RUNNING, None, None)),
        (Trace("completed", 160), (Outcome.COMPLETED, 160, None)),
        (Trace("compensated", 160), (Outcome.COMPENSATED, 160, None)),
        (Trace("failed", 160), (Outcome.FAILED_AGAIN, 160, None)),
        (Trace(None, None), (Outcome.GONE, 999, None)),
        # A dead letter after the action, even if it was retried since, is a failure.
        (
            Trace("completed", 300, (120,), (LaterAction(200, "sweeper", "retry", 3),)),
            (Outcome.FAILED_AGAIN, 120, None),
        ),
        # A dead letter before the action is not this action's.
        (Trace("running", 150, (90,)), (Outcome.RUNNING, None, None)),
        # Someone acted again before it ended: what follows is theirs.
        (
            Trace("cancelled", 130, (), (LaterAction(130, "bob", "cancel", 2),)),
            (Outcome.SUPERSEDED, 130, "cancel by bob"),
        ),
        # The action's own audit row (version 1 -> 2) does not supersede it.
        (
            Trace("completed", 170, (), (LaterAction(100, "ann", "retry", 1),)),
            (Outcome.COMPLETED, 170, None),
        ),
    ],
)
def test_follow_decides_each_result_and_when_it_ended(
    trace: Trace, expected: tuple[Outcome, int | None, str | None]
) -> None:
    found = follow(acted_at=100, version_after=2, trace=trace, now=999)
    assert (found.result, found.ended_at, found.by) == expected
    assert found.is_final is (expected[0] is not Outcome.RUNNING)
