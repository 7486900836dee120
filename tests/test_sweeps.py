"""The sweeps, one by one, on a clock the test moves: each finds what it should and
nothing else, and running it twice in a row changes nothing more.

No worker runs here: instances are started (their doorbells recorded, never
answered), run inline, or "begun by a worker that died" by hand, so every
change a test sees was made by the sweep it calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from engine import IdempotencyGuard, Retry, SagaEngine, SagaState
from engine.definition import StuckPolicy
from engine.model import Instance, idempotency_key
from engine.origins import Origin
from engine.queries import InstanceFilter, Queries
from engine.states import Phase, StepStatus
from engine.store import schema as t
from engine.sweeper.passes import SWEEPER
from tests.helpers.sweeps import REFUND_FAILS, World, begun_by_a_dead_worker, saga, step, undo


@pytest.fixture
def world(store_url: str) -> Iterator[World]:
    made = World(store_url)
    yield made
    made.close()


def versions(engine: SagaEngine, *ids: str) -> list[int]:
    return [engine.get(i).version for i in ids]


def events(engine: SagaEngine, saga_id: str) -> list[tuple[str, str]]:
    return [(e.kind, e.actor) for e in Queries(engine.store).timeline(saga_id)]


def audit(engine: SagaEngine, saga_id: str) -> list[tuple[str, str, str]]:
    found = Queries(engine.store).operator_actions(saga_id=saga_id)
    return [(a.actor, a.action, a.reason) for a in reversed(found)]


def origins(engine: SagaEngine, saga_id: str) -> list[tuple[str, str | None]]:
    found = Queries(engine.store).operator_actions(saga_id=saga_id)
    return [(a.origin, a.origin_detail) for a in reversed(found)]


# -- dispatch: overdue deadlines, expired leases, lost doorbells -------------------------


def test_an_attempt_past_its_deadline_whose_worker_died_is_timed_out_and_nothing_else(
    world: World,
) -> None:
    trip = saga("trip", default_timeout=timedelta(seconds=30))
    engine = world.engine(trip)
    dead = engine.start("trip", {}).id
    begun_by_a_dead_worker(engine, dead, lease=timedelta(seconds=10))
    unclaimed = engine.start("trip", {}).id  # its doorbell was lost; due since T0
    done = engine.run("trip", {}).id
    world.clock.advance(seconds=55)
    live = engine.start("trip", {}).id  # held by a live worker, deadline not reached
    begun_by_a_dead_worker(engine, live, lease=timedelta(seconds=30))
    fresh = engine.start("trip", {}).id  # due for 5 s only: a worker will get to it
    world.clock.advance(seconds=5)
    world.bells.take()
    others = [live, done, unclaimed, fresh]
    before = versions(engine, *others)

    counts = engine.sweeps().dispatch()

    assert counts == {"settled": 1, "leases_cleared": 0, "rung": 2}
    timed_out = engine.get(dead)
    assert timed_out.steps[0].status is StepStatus.PENDING  # its retry policy applies
    assert timed_out.lease_owner is None
    assert events(engine, dead)[-1] == ("attempt_timed_out", SWEEPER)
    assert world.bells.take() == sorted([dead, unclaimed])
    assert versions(engine, *others) == before

    again = engine.sweeps().dispatch()

    assert again == {"settled": 0, "leases_cleared": 0, "rung": 1}  # still nobody claimed it
    assert world.bells.take() == [unclaimed]
    assert events(engine, dead)[-1] == ("attempt_timed_out", SWEEPER)
    assert versions(engine, *others) == before


def test_an_expired_lease_before_the_deadline_is_an_abandoned_attempt(world: World) -> None:
    engine = world.engine(saga("trip"))
    saga_id = engine.start("trip", {}).id
    begun_by_a_dead_worker(engine, saga_id, lease=timedelta(seconds=10))
    world.clock.advance(seconds=11)

    assert engine.sweeps().dispatch()["settled"] == 1

    inst = engine.get(saga_id)
    assert events(engine, saga_id)[-1] == ("attempt_abandoned", SWEEPER)
    assert inst.steps[0].attempts == 1 and inst.steps[0].status is StepStatus.PENDING
    assert engine.sweeps().dispatch()["settled"] == 0


def test_an_expired_lease_with_nothing_in_flight_is_cleared_and_rung(world: World) -> None:
    engine = world.engine(saga("trip"))
    saga_id = engine.start("trip", {}).id
    # Claimed, then the worker died before beginning anything.
    assert engine.store.claim(saga_id, "dead-worker", 10_000, world.clock()) is not None
    world.clock.advance(seconds=11)
    world.bells.take()

    counts = engine.sweeps().dispatch()

    assert counts == {"settled": 0, "leases_cleared": 1, "rung": 1}
    assert engine.get(saga_id).lease_owner is None
    assert events(engine, saga_id) == [("saga_started", "test-host")]
    assert world.bells.take() == [saga_id]


def test_a_saga_the_sweeper_does_not_know_is_rung_but_not_settled(world: World) -> None:
    engine = world.engine(saga("trip"))
    saga_id = engine.start("trip", {}).id
    begun_by_a_dead_worker(engine, saga_id, lease=timedelta(seconds=10))
    world.clock.advance(minutes=11)
    stranger = world.engine()  # knows no sagas
    before = engine.get(saga_id).version
    world.bells.take()

    assert stranger.sweeps().dispatch() == {"settled": 0, "leases_cleared": 0, "rung": 1}
    assert engine.get(saga_id).version == before  # left for a worker that knows it


# -- stuck detection --------------------------------------------------------------------


def test_no_progress_past_expected_duration_plus_grace_is_flagged_once(world: World) -> None:
    slow = saga(
        "slow", stuck_grace=timedelta(minutes=2), default_expected_duration=timedelta(minutes=1)
    )
    slow.add_step("c", step("c"), undo("c"), expected_duration=timedelta(minutes=20))
    other = saga("other")  # 10 min timeout + 5 min grace
    engine = world.engine(slow, other)
    stuck = engine.start("slow", {}).id  # never picked up: step a, allowed 3 min
    at_c = engine.run("slow", {"fail": ["c"]}).id  # waits at step c, allowed 22 min
    done = engine.run("slow", {}).id
    failed = engine.run("slow", {"fatal": ["b"], "fail_undo": ["a"]}).id
    elsewhere = engine.start("other", {}).id
    assert [engine.get(i).state for i in (done, failed)] == [
        SagaState.COMPLETED,
        SagaState.FAILED,
    ]
    world.clock.advance(minutes=3, seconds=1)
    others = [at_c, done, failed, elsewhere]
    before = versions(engine, stuck, *others)

    assert engine.sweeps().stuck() == {"flagged": 1, "retried": 0, "compensated": 0, "cleared": 0}

    assert versions(engine, stuck, *others) == before  # a finding, not a transition
    queries = Queries(engine.store)
    assert queries.stuck_since(stuck) == world.clock.now
    assert [queries.stuck_since(i) for i in others] == [None] * 4
    [flagged] = [e for e in queries.timeline(stuck) if e.kind == "stuck_detected"]
    assert (flagged.actor, flagged.step_name, flagged.phase) == (SWEEPER, "a", "action")
    assert flagged.detail is not None
    assert flagged.detail["policy"] == "alert" and flagged.detail["allowed_ms"] == 180_000
    assert [s.id for s in queries.list_instances(InstanceFilter(stuck=True)).items] == [stuck]
    assert engine.store.live_counts().stuck == {"slow": 1, "other": 0}

    world.clock.advance(minutes=1)
    assert engine.sweeps().stuck()["flagged"] == 0
    assert events(engine, stuck).count(("stuck_detected", SWEEPER)) == 1


def test_progress_clears_the_flag(world: World) -> None:
    engine = world.engine(saga("slow", stuck_grace=timedelta(0)))
    saga_id = engine.start("slow", {}).id
    world.clock.advance(minutes=11)
    engine.sweeps().stuck()
    assert Queries(engine.store).stuck_since(saga_id) is not None

    engine.operations.retry(saga_id, actor="ann", reason="nudge it")

    assert Queries(engine.store).stuck_since(saga_id) is None
    assert engine.store.live_counts().stuck == {"slow": 0}
    world.clock.advance(seconds=30)
    assert engine.sweeps().stuck()["cleared"] == 1  # the next pass notes it, once
    assert engine.sweeps().stuck()["cleared"] == 0
    kinds = [e.kind for e in Queries(engine.store).timeline(saga_id)]
    assert kinds[kinds.index("stuck_detected") :] == [
        "stuck_detected",
        "operator_retry",
        "stuck_cleared",
    ]
    [cleared] = [e for e in Queries(engine.store).timeline(saga_id) if e.kind == "stuck_cleared"]
    assert cleared.actor == SWEEPER and cleared.detail is not None
    assert cleared.detail["flagged_at"] == world.clock.now - 30_000


def test_the_retry_policy_retries_once_per_stretch_without_progress(world: World) -> None:
    engine = world.engine(
        saga("nudged", stuck_policy=StuckPolicy.RETRY, stuck_grace=timedelta(minutes=1))
    )
    saga_id = engine.start("nudged", {}).id
    world.clock.advance(minutes=12)
    world.bells.take()

    assert engine.sweeps().stuck() == {"flagged": 1, "retried": 1, "compensated": 0, "cleared": 1}

    [(actor, action, reason)] = audit(engine, saga_id)
    assert (actor, action) == (SWEEPER, "retry")
    # The sweeper's own doing, whatever name a person might claim: its origin says so.
    assert origins(engine, saga_id) == [("sweeper", engine.owner)]
    assert reason.startswith("stuck: no progress since") and "policy is retry" in reason
    assert world.bells.take() == [saga_id]
    assert events(engine, saga_id)[-3:] == [
        ("stuck_detected", SWEEPER),
        ("operator_retry", f"operator:{SWEEPER}"),
        ("stuck_cleared", SWEEPER),
    ]

    world.clock.advance(minutes=12)  # the retry did not help: flagged again, not retried again
    assert engine.sweeps().stuck() == {"flagged": 1, "retried": 0, "compensated": 0, "cleared": 0}
    assert len(audit(engine, saga_id)) == 1
    assert Queries(engine.store).stuck_since(saga_id) == world.clock.now


def test_a_person_claiming_to_be_the_sweeper_does_not_stand_in_for_it(world: World) -> None:
    # `saga retry ID --actor sweeper` records the claim, from the CLI; the sweeper judges
    # what it did by the origin only its own door records, so its policies still apply.
    policy = Retry(max_attempts=1, initial_delay=timedelta(minutes=1), jitter=0.0)
    engine = world.engine(
        saga("nudged", stuck_policy=StuckPolicy.RETRY, stuck_grace=timedelta(minutes=1)),
        saga("refund", dead_letter_retry=policy),
    )
    stuck = engine.start("nudged", {}).id
    refund = engine.run("refund", REFUND_FAILS).id
    claimed = Origin.of("cli", "mallory@laptop")
    world.clock.advance(minutes=1)
    engine.operations.retry(stuck, actor=SWEEPER, reason="pretending", origin=claimed)
    engine.operations.retry(refund, actor=SWEEPER, reason="pretending", origin=claimed)
    assert run_again(engine, refund).state is SagaState.FAILED

    world.clock.advance(minutes=12)
    assert engine.sweeps().stuck()["retried"] == 1  # the claim did not count as the sweeper's
    # Its one automatic retry is still there (due at once: the dead letter is old enough).
    assert engine.sweeps().dead_letters() == {"planned": 1, "retried": 1, "dropped": 0}


def test_the_compensate_policy_force_compensates(world: World) -> None:
    engine = world.engine(
        saga("undone", stuck_policy="compensate", stuck_grace=timedelta(minutes=1))
    )
    saga_id = engine.run("undone", {"fail": ["b"]}).id  # a succeeded, b waits an hour
    world.clock.advance(minutes=11, seconds=1)

    assert engine.sweeps().stuck() == {"flagged": 1, "retried": 0, "compensated": 1, "cleared": 1}

    inst = engine.get(saga_id)
    assert inst.state is SagaState.COMPENSATING and inst.phase is Phase.COMPENSATE
    assert [(a, act) for a, act, _ in audit(engine, saga_id)] == [(SWEEPER, "compensate")]
    assert engine.sweeps().stuck()["flagged"] == 0  # compensating is progress


def test_a_policy_the_state_refuses_leaves_the_flag_for_a_person(world: World) -> None:
    engine = world.engine(saga("held", stuck_policy="retry", stuck_grace=timedelta(0)))
    saga_id = engine.start("held", {}).id
    world.clock.advance(minutes=5)
    # A live worker holds it with an attempt in flight (its heartbeat renews the lease).
    begun_by_a_dead_worker(engine, saga_id, lease=timedelta(hours=1))
    world.clock.advance(minutes=30)

    assert engine.sweeps().stuck() == {"flagged": 1, "retried": 0, "compensated": 0, "cleared": 0}
    assert audit(engine, saga_id) == []
    assert Queries(engine.store).stuck_since(saga_id) == world.clock.now


# -- dead-letter auto-retry -----------------------------------------------------------------


def dead_letters(engine: SagaEngine, saga_id: str) -> list[Any]:
    d = t.dead_letters.c
    query = sa.select(t.dead_letters).where(d.saga_id == saga_id).order_by(d.id)
    with engine.store.db.connect() as c:
        return list(c.execute(query))


def run_again(engine: SagaEngine, saga_id: str) -> Instance:
    """What a worker would do with the doorbell: claim it and advance it."""
    held = engine.store.claim(saga_id, engine.owner, engine.lease_ms, engine.clock())
    assert held is not None
    return engine.executor.advance(held)


def test_dead_letters_are_retried_automatically_with_backoff_up_to_the_limit(
    world: World,
) -> None:
    policy = Retry(
        max_attempts=2,
        initial_delay=timedelta(minutes=1),
        backoff=2.0,
        max_delay=timedelta(hours=1),
        jitter=0.0,
    )
    engine = world.engine(saga("refund", dead_letter_retry=policy), saga("manual"))
    saga_id = engine.run("refund", REFUND_FAILS).id
    manual = engine.run("manual", REFUND_FAILS).id
    sweeps = engine.sweeps()

    assert sweeps.dead_letters() == {"planned": 2, "retried": 0, "dropped": 0}
    [first] = dead_letters(engine, saga_id)
    assert (first.auto_retries, first.auto_retry_at) == (0, first.created_at + 60_000)

    world.clock.advance(seconds=59)
    assert sweeps.dead_letters() == {"planned": 0, "retried": 0, "dropped": 0}
    world.clock.advance(seconds=1)
    assert sweeps.dead_letters() == {"planned": 0, "retried": 1, "dropped": 0}
    assert sweeps.dead_letters() == {"planned": 0, "retried": 0, "dropped": 0}  # once
    assert engine.get(saga_id).state is SagaState.COMPENSATING
    assert audit(engine, saga_id) == [(SWEEPER, "retry", "automatic dead-letter retry 1/2")]
    assert origins(engine, saga_id) == [("sweeper", engine.owner)]

    assert run_again(engine, saga_id).state is SagaState.FAILED  # the undo fails again
    assert sweeps.dead_letters()["planned"] == 1
    second = dead_letters(engine, saga_id)[-1]
    assert (second.auto_retries, second.auto_retry_at) == (1, second.created_at + 120_000)
    world.clock.advance(minutes=2)
    assert sweeps.dead_letters()["retried"] == 1
    assert audit(engine, saga_id)[-1][2] == "automatic dead-letter retry 2/2"

    assert run_again(engine, saga_id).state is SagaState.FAILED
    assert sweeps.dead_letters()["planned"] == 1
    third = dead_letters(engine, saga_id)[-1]
    assert (third.auto_retries, third.auto_retry_at, third.resolved_at) == (2, None, None)
    world.clock.advance(days=1)
    assert sweeps.dead_letters() == {"planned": 0, "retried": 0, "dropped": 0}
    assert engine.get(saga_id).state is SagaState.FAILED  # the limit: a person takes over

    [untouched] = dead_letters(engine, manual)  # no policy: planned as never, never retried
    assert (untouched.auto_retries, untouched.auto_retry_at, untouched.resolved_at) == (
        0,
        None,
        None,
    )
    assert audit(engine, manual) == []


def test_an_automatic_retry_is_dropped_when_its_policy_went_away(world: World) -> None:
    policy = Retry(max_attempts=3, initial_delay=timedelta(minutes=1), jitter=0.0)
    engine = world.engine(saga("refund", dead_letter_retry=policy))
    saga_id = engine.run("refund", REFUND_FAILS).id
    engine.sweeps().dead_letters()
    world.clock.advance(minutes=2)
    redeployed = world.engine(saga("refund"))  # the same saga, now without the policy

    assert redeployed.sweeps().dead_letters() == {"planned": 0, "retried": 0, "dropped": 1}
    assert engine.get(saga_id).state is SagaState.FAILED
    [letter] = dead_letters(engine, saga_id)
    assert (letter.auto_retry_at, letter.resolved_at) == (None, None)


# -- retention ------------------------------------------------------------------------------


def row_counts(engine: SagaEngine, saga_id: str) -> dict[str, int]:
    counts = {}
    with engine.store.db.connect() as c:
        for table in (t.instances, t.steps, t.events, t.dead_letters, t.operator_actions):
            column = table.c.id if table is t.instances else table.c.saga_id
            query = sa.select(sa.func.count()).where(column == saga_id)
            counts[table.name] = int(c.execute(query).scalar_one())
    return counts


def test_retention_purges_old_finished_instances_and_keeps_the_audit_log(world: World) -> None:
    engine = world.engine(saga("trip"), retention_days=1.0, sweep_batch=2)
    old_done = [engine.run("trip", {}).id for _ in range(3)]
    old_compensated = engine.run("trip", {"fatal": ["b"]}).id
    old_cancelled = engine.start("trip", {}).id
    engine.operations.cancel(old_cancelled, actor="ann", reason="customer changed their mind")
    old_running = engine.start("trip", {}).id
    old_failed = engine.run("trip", REFUND_FAILS).id
    world.clock.advance(days=1, seconds=1)
    recent = engine.run("trip", {}).id
    kept = [old_running, old_failed, recent]
    purged = [*old_done, old_compensated, old_cancelled]

    sweeps = engine.sweeps()
    passes = [sweeps.retention()["purged"] for _ in range(5)]  # batches of 2
    assert passes[0] >= 2 and sum(passes) == 5 and passes[-1] == 0

    for saga_id in purged:
        assert row_counts(engine, saga_id) == {
            "saga_instances": 0,
            "saga_steps": 0,
            "saga_events": 0,
            "saga_dead_letters": 0,
            "saga_operator_actions": 1 if saga_id == old_cancelled else 0,
        }
    assert [engine.get(i).state for i in kept] == [
        SagaState.RUNNING,
        SagaState.FAILED,
        SagaState.COMPLETED,
    ]
    assert row_counts(engine, old_failed)["saga_dead_letters"] == 1


def keys_of(inst: Instance) -> list[str]:
    return [idempotency_key(inst.id, s.name, phase) for s in inst.steps for phase in Phase]


def test_retention_purges_the_idempotency_keys_of_the_purged_steps(world: World) -> None:
    engine = world.engine(saga("trip"), retention_days=1.0)
    old = engine.run("trip", {}).id
    world.clock.advance(days=1, seconds=1)
    recent = engine.run("trip", {}).id
    guard = IdempotencyGuard(engine.store.db, scope="hotel")
    for inst in (engine.get(old), engine.get(recent)):
        for key in keys_of(inst):
            guard.run_once(key, lambda conn: "booked")
    guard.run_once("order-7:charge", lambda conn: "charged")  # a key of the service's own

    assert engine.sweeps().retention()["purged"] == 1

    with engine.store.db.connect() as c:
        left = set(c.execute(sa.select(t.idempotency_keys.c.key)).scalars())
    assert left == {*keys_of(engine.get(recent)), "order-7:charge"}


def test_retention_purges_in_bounded_batches(world: World) -> None:
    engine = world.engine(saga("trip"))
    for _ in range(5):
        engine.run("trip", {})
    world.clock.advance(days=2)

    assert engine.store.sweeps.purge_finished(world.clock.now, limit=2) == 2
    assert engine.store.sweeps.purge_finished(world.clock.now, limit=10) == 3
    assert engine.store.sweeps.purge_finished(world.clock.now, limit=10) == 0


def test_retention_is_off_unless_configured(world: World) -> None:
    engine = world.engine(saga("trip"))
    saga_id = engine.run("trip", {}).id
    world.clock.advance(days=3650)

    assert engine.sweeps().retention() == {"purged": 0, "snapshots": 0}
    assert engine.get(saga_id).state is SagaState.COMPLETED


def test_a_full_pass_twice_in_a_row_is_harmless(world: World) -> None:
    engine = world.engine(
        saga("mixed", stuck_policy="retry", dead_letter_retry=Retry(max_attempts=1)),
        retention_days=1.0,
    )
    for payload in ({}, {"fail": ["b"]}, REFUND_FAILS):
        engine.run("mixed", payload)
    engine.start("mixed", {})
    begun_by_a_dead_worker(engine, engine.start("mixed", {}).id, timedelta(seconds=10))
    world.clock.advance(days=2)
    first = engine.sweeps().run_all()
    assert sum(n for counts in first.values() for n in counts.values()) > 0
    with engine.store.db.connect() as c:
        snapshot = [c.execute(sa.select(table)).all() for table in t.metadata.sorted_tables]

    engine.sweeps().run_all()

    with engine.store.db.connect() as c:
        after = [c.execute(sa.select(table)).all() for table in t.metadata.sorted_tables]
    assert after == snapshot
