"""Dead-letter recovery and bulk recovery, at the engine and through the ``saga`` CLI.

Bulk: a dry run changes nothing; the rate limiter spaces items as promised
(checked on an injected clock, not by timing); a stop from another process
takes effect before the next item; the failure threshold halts a run; the
report and the audit log account for every item. Single dead letters: edit
the payload then retry (the audit record keeps before and after), and
resolve by hand.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from engine import (
    NO_RETRY,
    Action,
    InvalidInput,
    InvalidTransition,
    NonRetryableError,
    Saga,
    SagaEngine,
    SagaState,
    StepContext,
    StepKind,
)
from engine.bulk.model import MIN_SAMPLE, BulkFilter, BulkStatus, ItemOutcome, SelectionChanged
from engine.bulk.runner import RateLimiter
from engine.cli import main
from engine.errors import ConcurrencyConflict
from engine.model import Instance
from engine.queries import Queries
from engine.store import schema as t
from tests.helpers.engines import Engines, wait_for, wait_state

#: Business keys whose ``ship`` step fails; a test removes its keys to "fix the carrier".
BROKEN: set[str] = set()


def reserve(ctx: StepContext) -> dict[str, Any]:
    return {"reservation": f"R-{ctx.business_key}"}


def release(ctx: StepContext, output: Any) -> None:
    return None


def charge(ctx: StepContext) -> dict[str, Any]:
    return {"charged": ctx.payload.get("amount", 0)}


def ship(ctx: StepContext) -> dict[str, Any]:
    if ctx.business_key in BROKEN or ctx.payload.get("carrier") == "broken":
        raise NonRetryableError(f"carrier rejected parcel {ctx.business_key}")
    return {"tracking": f"T-{ctx.business_key}"}


def wrap(ctx: StepContext) -> None:
    raise NonRetryableError("the wrapping machine is jammed")


parcel = Saga("parcel", default_retry=NO_RETRY, default_compensation_retry=NO_RETRY)
parcel.add_step("reserve", reserve, release)
parcel.add_step("charge", charge, kind=StepKind.PIVOT)
parcel.add_step("ship", ship)

#: A saga the bulk engine in some tests does not load, so acting on it is an error.
gift = Saga("gift", default_retry=NO_RETRY, default_compensation_retry=NO_RETRY)
gift.add_step("pay", charge, kind=StepKind.PIVOT)
gift.add_step("wrap", wrap)


@pytest.fixture
def engine(engines: Engines) -> SagaEngine:
    return engines(parcel, gift)


def stranded(engine: SagaEngine, n: int, *, saga: str = "parcel", **payload: Any) -> list[str]:
    """``n`` instances dead-lettered at their last step; their keys stay BROKEN."""
    ids = []
    for _ in range(n):
        key = f"P-{uuid.uuid4().hex[:10]}"
        BROKEN.add(key)
        inst = engine.run(saga, {"amount": 5, **payload}, business_key=key)
        assert inst.state is SagaState.FAILED
        ids.append(inst.id)
    return ids


def fix_all() -> None:
    BROKEN.clear()


#: What a dry run keeps: the snapshot a confirmation acts on.
SNAPSHOTS = {"saga_bulk_snapshots", "saga_bulk_snapshot_items"}


def row_counts(url: str, *, but: set[str] = SNAPSHOTS) -> dict[str, int]:
    """Rows per table, leaving out ``but`` (by default the dry runs' snapshots)."""
    db = sa.create_engine(url)
    try:
        with db.connect() as conn:
            return {
                table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for table in t.metadata.sorted_tables
                if table.name not in but
            }
    finally:
        db.dispose()


def audit(engine: SagaEngine, saga_id: str) -> list[Any]:
    return Queries(engine.store).operator_actions(saga_id=saga_id)


class FakeClock:
    """Time that only moves when someone sleeps: the runner's schedule, made visible."""

    def __init__(self) -> None:
        self.t = time.time()
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[int], None] | None = None

    def monotonic(self) -> float:
        return self.t

    def now(self) -> int:
        return int(self.t * 1000)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))


def failed_parcels() -> BulkFilter:
    return BulkFilter(saga_name="parcel", state=SagaState.FAILED)


# -- dry run ---------------------------------------------------------------------------


def test_a_dry_run_counts_and_samples_and_changes_no_instance(
    engine: SagaEngine, store_url: str
) -> None:
    ids = stranded(engine, 3)
    engine.run("parcel", {"amount": 1}, business_key="fine")
    bulk = engine.bulk_recovery()
    before = row_counts(store_url)

    dry = bulk.dry_run(Action.RETRY, failed_parcels())

    assert row_counts(store_url) == before  # only the snapshot of what it showed is kept
    assert row_counts(store_url, but=set())["saga_bulk_snapshot_items"] == 3
    assert dry.snapshot and dry.expires_at == pytest.approx(engine.clock() + 3_600_000, abs=60_000)
    assert dry.count == 3 and not dry.too_many
    assert [s.saga_id for s in dry.sample] == ids  # oldest first: the order they run in
    assert all(s.applies and s.step_name == "ship" for s in dry.sample)
    assert "carrier rejected parcel" in (dry.sample[0].error or "")


def test_the_filter_narrows_by_step_error_text_and_time(engine: SagaEngine) -> None:
    early = stranded(engine, 2)
    cut = engine.clock() + 1
    time.sleep(0.01)
    late = stranded(engine, 1)
    jammed = engine.run("gift", {}, business_key="G-1")
    bulk = engine.bulk_recovery()

    def matched(**kw: Any) -> list[str]:
        return [s.saga_id for s in bulk.dry_run(Action.RETRY, BulkFilter(**kw)).sample]

    assert matched(state=SagaState.FAILED, step_name="wrap") == [jammed.id]
    assert matched(error_text="CARRIER rejected") == [*early, *late]  # any case
    assert matched(error_text="100%_") == []  # LIKE wildcards are plain text here
    assert matched(saga_name="parcel", time_to=cut) == early
    assert matched(saga_name="parcel", time_from=cut) == late
    assert matched(state=SagaState.COMPLETED) == []


def test_an_empty_or_backwards_filter_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least one"):
        BulkFilter()
    with pytest.raises(InvalidInput, match="before"):
        BulkFilter(time_from=2, time_to=1)


def test_confirming_a_count_the_filter_no_longer_matches_writes_nothing(
    engine: SagaEngine, store_url: str
) -> None:
    stranded(engine, 2)
    bulk = engine.bulk_recovery()
    seen = bulk.dry_run(Action.RETRY, failed_parcels()).count
    stranded(engine, 1)  # another dead letter arrives meanwhile
    before = row_counts(store_url)

    with pytest.raises(SelectionChanged, match="now matches 3 instances, not the 2"):
        bulk.create(Action.RETRY, failed_parcels(), actor="ann", reason="r", expected_count=seen)

    assert row_counts(store_url) == before


# -- running ---------------------------------------------------------------------------


def test_a_bulk_retry_recovers_every_instance_and_the_report_is_complete(
    engine: SagaEngine, engines: Engines
) -> None:
    ids = stranded(engine, 4)
    bulk = engine.bulk_recovery()
    op = bulk.create(
        Action.RETRY,
        failed_parcels(),
        actor="ann",
        reason="carrier is back (INC-7)",
        expected_count=4,
        batch_size=3,
        rate_per_second=1000,
    )
    fix_all()
    engines.worker(engine)

    done = bulk.run(op.id)

    assert done.status is BulkStatus.COMPLETED
    assert (done.total, done.processed, done.applied, done.skipped, done.errors) == (4, 4, 4, 0, 0)
    items = bulk.store.items(op.id).items
    assert [i.saga_id for i in items] == ids
    assert all(i.outcome is ItemOutcome.APPLIED and i.processed_at for i in items)
    for saga_id in ids:
        wait_state(engine, saga_id, SagaState.COMPLETED)
        (entry,) = audit(engine, saga_id)
        assert (entry.actor, entry.action) == ("ann", "retry")
        assert entry.reason == "carrier is back (INC-7)"
        assert entry.detail == {"bulk_operation": op.id}


def test_an_instance_that_changed_since_the_snapshot_is_skipped_and_noted(
    engine: SagaEngine,
) -> None:
    first, moved = stranded(engine, 2)
    bulk = engine.bulk_recovery()
    op = bulk.create(
        Action.CANCEL, failed_parcels(), actor="ann", reason="give up", expected_count=2
    )
    engine.operations.skip(moved, actor="bob", reason="shipped by hand")

    done = bulk.runner(sleep=lambda s: None).run(op.id)

    assert (done.applied, done.skipped) == (1, 1)
    skipped = bulk.store.items(op.id, outcome=ItemOutcome.SKIPPED).items
    assert [i.saga_id for i in skipped] == [moved]
    assert "changed since you read it" in (skipped[0].error or "")
    assert engine.get(first).state is SagaState.CANCELLED
    assert engine.get(moved).state is SagaState.COMPLETED  # bob's skip stands
    note = audit(engine, moved)[0]
    assert note.action == "bulk_not_applied"
    assert (note.state_before, note.state_after) == ("completed", "completed")
    assert note.detail["bulk_operation"] == op.id and note.detail["outcome"] == "skipped"


def test_the_rate_limit_spaces_items_on_the_runners_clock(engine: SagaEngine) -> None:
    stranded(engine, 25)
    bulk = engine.bulk_recovery()
    rate = 10.0
    op = bulk.create(
        Action.CANCEL,
        failed_parcels(),
        actor="ann",
        reason="r",
        expected_count=25,
        batch_size=7,
        rate_per_second=rate,
    )
    clock = FakeClock()

    bulk.runner(now=clock.now, monotonic=clock.monotonic, sleep=clock.sleep).run(op.id)

    times = sorted(i.processed_at or 0 for i in bulk.store.items(op.id).items)
    assert len(times) == 25
    # Any one-second window holds at most rate + 1 items (one slot of slack).
    for start in times:
        in_window = [x for x in times if start <= x < start + 1000]
        assert len(in_window) <= rate + 1
    assert times[-1] - times[0] >= (25 - 1) / rate * 1000 - 1
    assert len(clock.sleeps) == 24  # every item after the first waited for its slot


def test_the_rate_limiter_never_bursts_after_a_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter(4.0, clock.monotonic, clock.sleep)
    limiter.wait()
    clock.t += 10  # a slow item: the limiter must not "catch up" with a burst
    slots = []
    for _ in range(5):
        limiter.wait()
        slots.append(clock.t)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert gaps == pytest.approx([0.25] * 4)
    with pytest.raises(InvalidInput):
        RateLimiter(0)


def test_stop_from_another_process_takes_effect_before_the_next_item(
    engine: SagaEngine, engines: Engines
) -> None:
    stranded(engine, 12)
    bulk = engine.bulk_recovery()
    op = bulk.create(
        Action.CANCEL, failed_parcels(), actor="ann", reason="r", expected_count=12, batch_size=5
    )
    elsewhere = engines(parcel, gift, worker_id="other-console").bulk_recovery()
    clock = FakeClock()
    # While the runner waits for the slot of its 5th item, someone elsewhere clicks Stop.
    clock.on_sleep = lambda n: elsewhere.stop(op.id, "bob") if n == 4 else None

    done = bulk.runner(now=clock.now, monotonic=clock.monotonic, sleep=clock.sleep).run(op.id)

    assert done.status is BulkStatus.STOPPED
    assert done.note == "stopped by bob" and done.stop_requested_by == "bob"
    assert done.processed == 5  # the item whose slot it was waiting for, then no more
    assert len(bulk.store.items(op.id, outcome=ItemOutcome.PENDING).items) == 7
    cancelled = Queries(engine.store).counts_by_state()["cancelled"]
    assert cancelled == 5


def test_errors_past_the_failure_threshold_halt_the_run(
    engine: SagaEngine, engines: Engines
) -> None:
    stranded(engine, 12, saga="gift")  # this console has no definition of gift: errors
    stranded(engine, 8)
    only_parcels = engines(parcel, worker_id="parcel-console").bulk_recovery()
    op = only_parcels.create(
        Action.CANCEL,
        BulkFilter(state=SagaState.FAILED),
        actor="ann",
        reason="r",
        expected_count=20,
        max_failure_rate=0.5,
    )

    done = only_parcels.runner(sleep=lambda s: None).run(op.id)

    assert done.status is BulkStatus.HALTED
    assert done.processed == MIN_SAMPLE  # judged once the sample is big enough, then stopped
    assert done.errors == MIN_SAMPLE
    assert "over the 50% threshold" in (done.note or "")
    errors = only_parcels.store.items(op.id, outcome=ItemOutcome.ERROR).items
    assert "unknown saga 'gift v1'" in (errors[0].error or "")
    assert len(only_parcels.store.items(op.id, outcome=ItemOutcome.PENDING).items) == 10


def test_retries_that_fail_again_count_as_failures_and_halt_the_run(
    engine: SagaEngine, engines: Engines
) -> None:
    ids = stranded(engine, 15)  # the carrier is still down: every retry fails again
    engines.worker(engine)
    bulk = engine.bulk_recovery()
    op = bulk.create(
        Action.RETRY,
        failed_parcels(),
        actor="ann",
        reason="carrier back?",
        expected_count=15,
        batch_size=2,  # the runner follows its applied items after each batch
        max_failure_rate=0.3,
    )

    def settled(n: int) -> None:
        # Before the next slot, let the worker finish the retries applied so far.
        for saga_id in ids[:n]:
            wait_state(engine, saga_id, SagaState.FAILED)

    clock = FakeClock()
    clock.on_sleep = settled
    done = bulk.runner(now=clock.now, monotonic=clock.monotonic, sleep=clock.sleep).run(op.id)

    assert done.status is BulkStatus.HALTED
    # Judged once MIN_SAMPLE items had an outcome: the newest batch was still running then.
    assert MIN_SAMPLE <= done.processed <= MIN_SAMPLE + 2
    assert done.ended >= MIN_SAMPLE and done.failed_again == done.ended
    assert "over the 30% threshold" in (done.note or "")
    assert len(bulk.store.items(op.id, outcome=ItemOutcome.PENDING).items) == 15 - done.processed
    settled(done.processed)
    report = bulk.follow(op.id)  # what the report shows once the last ones settle
    assert report.settled and report.failed_again == report.processed
    again = bulk.store.items(op.id, outcome=ItemOutcome.FAILED_AGAIN).items
    assert [i.saga_id for i in again] == ids[: done.processed]
    assert all(i.state_now == "failed" and i.result == "failed_again" for i in again)


def test_an_interrupted_run_can_be_resumed_by_another_process_but_a_live_one_cannot(
    engine: SagaEngine,
) -> None:
    stranded(engine, 3)
    bulk = engine.bulk_recovery()
    op = bulk.create(Action.CANCEL, failed_parcels(), actor="ann", reason="r", expected_count=3)
    now = engine.clock()
    first = bulk.store.claim(op.id, "console-a", now)
    assert first is not None and first.runner == "console-a"
    assert bulk.store.claim(op.id, "console-b", now + 1000) is None  # a-live runner keeps it

    later = now + first.stale_after_ms + 1
    assert bulk.get(op.id).interrupted(later)
    assert bulk.store.claim(op.id, "console-b", later) is not None
    done = bulk.runner(now=lambda: later + 10, sleep=lambda s: None).run(op.id)
    assert done.status is BulkStatus.RUNNING  # console-b holds it; this runner did not take it

    resumed = engine.bulk_recovery().store
    resumed.release(op.id, "console-b", "console-b died")
    finished = bulk.runner(sleep=lambda s: None).run(op.id)
    assert finished.status is BulkStatus.COMPLETED and finished.processed == 3


def test_stopping_an_interrupted_run_ends_it_at_once(engine: SagaEngine) -> None:
    stranded(engine, 2)
    bulk = engine.bulk_recovery()
    op = bulk.create(Action.CANCEL, failed_parcels(), actor="ann", reason="r", expected_count=2)
    assert bulk.store.claim(op.id, "console-a", engine.clock())
    bulk.store.release(op.id, "console-a", "console-a failed")  # nobody runs it now

    stopped = bulk.stop(op.id, "bob")

    assert stopped.status is BulkStatus.STOPPED and stopped.processed == 0
    with pytest.raises(InvalidTransition, match="already ended"):
        bulk.stop(op.id, "bob")


def test_bad_settings_are_refused_before_anything_is_written(
    engine: SagaEngine, store_url: str
) -> None:
    stranded(engine, 1)
    bulk = engine.bulk_recovery()
    before = row_counts(store_url)
    for bad in (
        {"reason": " "},
        {"batch_size": 0},
        {"rate_per_second": 0.0},
        {"max_failure_rate": 1.5},
        {"expected_count": 0},
    ):
        args: dict[str, Any] = {
            "actor": "ann",
            "reason": "r",
            "expected_count": 1,
            **bad,
        }
        with pytest.raises(InvalidInput):
            bulk.create(Action.RETRY, failed_parcels(), **args)
    assert row_counts(store_url) == before


# -- single dead letters: edit and retry, resolve by hand ------------------------------


def test_edit_the_payload_then_retry_records_before_and_after(
    engine: SagaEngine, engines: Engines
) -> None:
    inst = engine.run("parcel", {"amount": 5, "carrier": "broken"}, business_key="E-1")
    assert inst.state is SagaState.FAILED
    fixed = {"amount": 5, "carrier": "ups"}

    done = engine.operations.edit_and_retry(
        inst.id, fixed, actor="ann", reason="wrong carrier code", expected_version=inst.version
    )

    assert done.state is SagaState.RUNNING and done.payload == fixed
    assert engine.get(inst.id).payload == fixed  # stored, not only returned
    (entry,) = audit(engine, inst.id)
    assert entry.action == "edit_retry" and entry.reason == "wrong carrier code"
    assert entry.detail == {"payload_before": inst.payload, "payload_after": fixed}
    (record,) = Queries(engine.store).dead_letters(saga_id=inst.id, open_only=False)
    assert record.resolution == "edit_retry" and record.resolved_by == "operator:ann"
    engines.worker(engine)
    assert wait_state(engine, inst.id, SagaState.COMPLETED).payload == fixed


def test_an_edit_is_refused_when_stale_unchanged_or_not_json(engine: SagaEngine) -> None:
    inst = engine.run("parcel", {"carrier": "broken"}, business_key="E-2")
    ops = engine.operations
    with pytest.raises(InvalidInput, match="same as the saga's"):
        ops.edit_and_retry(inst.id, inst.payload, actor="ann", reason="r")
    with pytest.raises(InvalidInput):
        ops.edit_and_retry(inst.id, {"x": float("nan")}, actor="ann", reason="r")
    ops.retry(inst.id, actor="bob", reason="try as is")

    with pytest.raises(ConcurrencyConflict):
        ops.edit_and_retry(
            inst.id, {"carrier": "ups"}, actor="ann", reason="r", expected_version=inst.version
        )
    assert engine.get(inst.id).payload == {"carrier": "broken"}


def test_resolve_by_hand_ends_the_saga_cancelled_and_closes_the_dead_letter(
    engine: SagaEngine,
) -> None:
    inst = engine.run("parcel", {"carrier": "broken"}, business_key="R-1")

    done = engine.operations.resolve(
        inst.id, actor="ann", reason="shipped by courier", expected_version=inst.version
    )

    assert done.state is SagaState.CANCELLED
    (entry,) = audit(engine, inst.id)
    assert (entry.action, entry.state_before, entry.state_after) == (
        "resolve",
        "failed",
        "cancelled",
    )
    assert Queries(engine.store).dead_letters(saga_id=inst.id) == []  # none open
    last = Queries(engine.store).timeline(inst.id)[-1]
    assert last.kind == "operator_cancel" and last.detail["resolution"] == "resolved by hand"
    with pytest.raises(InvalidTransition, match="only a dead-lettered saga"):
        engine.operations.resolve(inst.id, actor="ann", reason="again")


def test_the_dead_letter_list_has_failing_step_error_and_first_and_last_failure(
    engine: SagaEngine, engines: Engines
) -> None:
    inst = engine.run("parcel", {"carrier": "broken"}, business_key="D-1")
    engine.operations.retry(inst.id, actor="ann", reason="try again")
    engines.worker(engine)
    wait_for(lambda: engine.get(inst.id).version > inst.version + 1)
    wait_state(engine, inst.id, SagaState.FAILED)
    other = engine.run("gift", {}, business_key="D-2")
    fine = engine.run("parcel", {}, business_key="D-3")
    assert fine.state is SagaState.COMPLETED

    page = Queries(engine.store).dead_lettered(limit=1)
    newest = page.items[0]
    older = Queries(engine.store).dead_lettered(before=page.next_cursor).items

    assert newest.saga_id == other.id and newest.step_name == "wrap"
    (again,) = older
    assert (again.saga_id, again.step_name, again.phase) == (inst.id, "ship", "action")
    assert again.attempts == 2 and "carrier rejected" in again.error
    assert again.first_failure_at < again.last_failure_at  # failing since the first attempt
    only_ship = Queries(engine.store).dead_lettered(step_name="ship").items
    assert [d.saga_id for d in only_ship] == [inst.id]


# -- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def saga(store_url: str) -> Callable[..., Result]:
    def invoke(*args: str) -> Result:
        env = {"SAGA_DATABASE_URL": store_url, "SAGA_APP": "", "USER": "tester"}
        return CliRunner().invoke(main, ["-A", __name__, *args], env=env)

    return invoke


def test_cli_lists_dead_letters_as_text_and_json(
    engine: SagaEngine, saga: Callable[..., Result]
) -> None:
    (saga_id,) = stranded(engine, 1)

    text = saga("deadletters")
    doc = json.loads(saga("deadletters", "--json").stdout)

    assert text.exit_code == 0 and saga_id in text.stdout and "ship" in text.stdout
    (item,) = doc["dead_letters"]
    assert item["saga_id"] == saga_id and item["attempts"] == 1
    assert doc["schema_version"] == 1 and doc["next_cursor"] is None


def test_cli_edit_retry_and_resolve(engine: SagaEngine, saga: Callable[..., Result]) -> None:
    inst = engine.run("parcel", {"carrier": "broken"}, business_key="C-1")
    other = engine.run("parcel", {"carrier": "broken"}, business_key="C-2")

    edited = saga(
        "edit-retry", inst.id, "--payload", '{"carrier": "ups"}', "--reason", "typo in carrier"
    )
    resolved = saga("resolve", other.id, "--reason", "refunded by hand", "--json")
    bad = saga("edit-retry", inst.id, "--payload", "{nope", "--reason", "r")
    refused = saga("resolve", other.id, "--reason", "again")

    assert edited.exit_code == 0, edited.output
    assert "edit_retry" in edited.stdout and engine.get(inst.id).payload == {"carrier": "ups"}
    assert resolved.exit_code == 0
    assert json.loads(resolved.stdout)["instance"]["state"] == "cancelled"
    assert bad.exit_code == 2 and "not JSON" in bad.stderr
    assert refused.exit_code == 4


def test_cli_bulk_dry_run_run_and_show(engine: SagaEngine, saga: Callable[..., Result]) -> None:
    ids = stranded(engine, 3)
    filters = ("--saga", "parcel", "--state", "failed", "--step", "ship")

    dry = saga("bulk", "dry-run", "cancel", *filters, "--json")
    mismatch = saga("bulk", "run", "cancel", *filters, "--reason", "r", "--expect", "2")
    run = saga(
        "bulk",
        "run",
        "cancel",
        *filters,
        "--reason",
        "customer gone",
        "--expect",
        "3",
        "--rate",
        "1000",
    )

    assert dry.exit_code == 0
    assert json.loads(dry.stdout)["count"] == 3
    assert mismatch.exit_code == 4 and "not the 2 you confirmed" in mismatch.stderr
    assert run.exit_code == 0, run.output
    assert "completed" in run.stdout and "3 applied" in run.stdout and "3 cancelled" in run.stdout
    op_id = run.stdout.split("bulk operation ")[1].split()[0].rstrip(":")
    shown = json.loads(saga("bulk", "show", op_id, "--json").stdout)
    assert shown["operation"]["status"] == "completed"
    assert shown["operation"]["results"]["cancelled"] == 3 and shown["operation"]["settled"]
    assert [i["saga_id"] for i in shown["items"]] == ids
    assert {(i["result"], i["final"]) for i in shown["items"]} == {("cancelled", True)}
    assert saga("bulk", "show", "nope").exit_code == 3
    assert saga("bulk", "stop", op_id).exit_code == 4  # it has ended


def test_cli_bulk_run_without_a_count_shows_the_dry_run_and_changes_nothing(
    engine: SagaEngine, saga: Callable[..., Result], store_url: str
) -> None:
    stranded(engine, 2)
    before = row_counts(store_url)

    result = saga("bulk", "run", "retry", "--state", "failed", "--reason", "r")

    assert result.exit_code == 2
    assert "--expect 2" in result.stderr and "--snapshot " in result.stderr
    assert row_counts(store_url) == before


def _instances(engine: SagaEngine) -> list[Instance]:
    page = Queries(engine.store).list_instances(limit=500)
    return [engine.get(i.id) for i in page.items]


def test_bulk_report_survives_a_new_engine(engine: SagaEngine, engines: Engines) -> None:
    stranded(engine, 2)
    bulk = engine.bulk_recovery()
    op = bulk.create(Action.CANCEL, failed_parcels(), actor="ann", reason="r", expected_count=2)
    bulk.runner(sleep=lambda s: None).run(op.id)

    fresh = engines(parcel, worker_id="restarted").bulk_recovery()

    again = fresh.get(op.id)
    assert again.status is BulkStatus.COMPLETED and again.processed == 2
    assert [o.id for o in fresh.store.recent()] == [op.id]
    assert all(i.state is SagaState.CANCELLED for i in _instances(engine))
    assert wait_for(lambda: fresh.store.items(op.id).items)
