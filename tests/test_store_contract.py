"""The store contract: one suite, run on SQLite and on PostgreSQL.

Everything an engine relies on from its store: creation deduplicated by
idempotency key, version- and owner-checked saves that write the state, the
timeline and any dead letter in one transaction, leases, and a schema that
matches its migrations.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from engine.decide import Run, begin_attempt, record_failure, record_success
from engine.errors import ConcurrencyConflict, SagaNotFound
from engine.model import DeadLetter, Event, EventKind, Instance, Transition, new_id
from engine.origins import IN_PROCESS, Origin
from engine.queries import Queries
from engine.states import Phase, SagaState, StepStatus
from engine.store import OperatorRecord, Store, open_store
from engine.store import schema as t
from engine.store.schema import metadata
from tests.helpers.pure import build_saga, fail, new_instance

T = 1_700_000_000_000
TTL = 10_000


def fresh(
    key: str | None = None, *, at: int = T, kinds: str = "cpr", payload: Any = None
) -> Transition:
    """A new-instance transition like the one the engine creates."""
    inst = replace(
        new_instance(build_saga(kinds), at),
        id=new_id(at),
        idempotency_key=key,
        payload=payload if payload is not None else {"order": 7},
    )
    return Transition(inst, (Event(EventKind.SAGA_STARTED, detail={"version": 1}),))


def started(inst: Instance, now: int) -> Transition:
    """The transition that begins attempt 1 of the current step."""
    return begin_attempt(inst, build_saga("cpr"), Run(inst.cursor, Phase.ACTION, 1), now)


def count(store: Store, table: sa.Table, **where: Any) -> int:
    query = sa.select(sa.func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with store.db.connect() as conn:
        return int(conn.execute(query).scalar_one())


class TestStoreContract:
    """What every backend must do; ``store_url`` runs each test on SQLite and PostgreSQL."""

    @pytest.fixture
    def store(self, store_url: str) -> Iterator[Store]:
        store = open_store(store_url)
        yield store
        store.dispose()

    # -- create ---------------------------------------------------------------------

    def test_create_then_load_round_trips_every_field(self, store: Store) -> None:
        tr = fresh("order-7", payload={"nested": {"list": [1, 2.5, None, "é"]}, "ok": True})
        inst, created = store.create(tr, "api")
        assert created
        loaded = store.load(inst.id)
        assert loaded == tr.instance
        assert loaded.steps[0].status is StepStatus.PENDING
        [event] = Queries(store).timeline(inst.id)
        assert (event.kind, event.actor, event.correlation_id, event.at) == (
            "saga_started",
            "api",
            "corr-1",
            T,
        )

    def test_the_same_idempotency_key_creates_one_instance(self, store: Store) -> None:
        first, created = store.create(fresh("order-7"), "api")
        again, created_again = store.create(fresh("order-7", payload={"other": 1}), "api")
        assert created and not created_again
        assert again == first
        assert count(store, t.instances) == 1
        assert count(store, t.steps) == 3
        assert count(store, t.events) == 1  # the duplicate wrote nothing

    def test_the_same_key_in_another_saga_or_no_key_is_a_new_instance(self, store: Store) -> None:
        store.create(fresh("order-7"), "api")
        other = fresh("order-7")
        other = replace(other, instance=replace(other.instance, saga_name="other"))
        assert store.create(other, "api")[1]
        assert store.create(fresh(None), "api")[1]
        assert store.create(fresh(None), "api")[1]
        assert count(store, t.instances) == 4

    @pytest.mark.parametrize("key", [None, "order-9"])
    def test_an_insert_tried_again_after_its_commit_counts_as_new(
        self, store: Store, key: str | None
    ) -> None:
        # retry_on_disconnect runs a start again when the connection dropped, and
        # the first try may have committed before it did: still one new instance,
        # and "created", so that its first command or doorbell goes out.
        tr = fresh(key)
        store.create(tr, "api")
        again, created = store.create(tr, "api")
        assert created and again == tr.instance
        assert count(store, t.instances) == 1
        other, created = store.create(fresh(key), "api") if key else (None, False)
        assert not created and (other is None or other.id == tr.instance.id)

    def test_racing_creates_with_one_key_make_one_instance(self, store: Store) -> None:
        barrier = threading.Barrier(6)
        results: list[tuple[Instance, bool]] = []

        def create() -> None:
            barrier.wait()
            results.append(store.create(fresh("race"), "api"))

        threads = [threading.Thread(target=create) for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(created for _, created in results) == [False] * 5 + [True]
        assert len({inst.id for inst, _ in results}) == 1
        assert count(store, t.instances) == 1

    def test_load_of_an_unknown_id(self, store: Store) -> None:
        with pytest.raises(SagaNotFound, match="no saga instance with id 'nope'"):
            store.load("nope")

    # -- save -----------------------------------------------------------------------

    def test_save_bumps_the_version_and_writes_steps_and_events(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        saved = store.save(inst, started(inst, T + 5), "w1")
        assert saved.version == 2
        loaded = store.load(inst.id)
        assert loaded == saved
        assert loaded.steps[0].status is StepStatus.RUNNING
        assert loaded.steps[0].deadline_at == T + 5 + 5_000
        events = Queries(store).timeline(inst.id)
        assert [(e.kind, e.step_name, e.phase, e.attempt, e.actor) for e in events[1:]] == [
            ("attempt_started", "s0", "action", 1, "w1")
        ]

    def test_a_stale_save_is_refused_with_the_actual_version(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        store.save(inst, started(inst, T + 5), "w1")
        with pytest.raises(ConcurrencyConflict) as err:
            store.save(inst, started(inst, T + 6), "w2")
        assert (err.value.expected, err.value.actual) == (1, 2)
        assert "you saw version 1, it is now at version 2" in str(err.value)
        assert store.load(inst.id).steps[0].started_at == T + 5
        assert count(store, t.events) == 2

    def test_a_save_of_a_vanished_instance_says_so(self, store: Store) -> None:
        ghost = fresh().instance
        with pytest.raises(ConcurrencyConflict) as err:
            store.save(ghost, started(ghost, T), "w1")
        assert err.value.actual is None
        assert "was deleted" in str(err.value)

    def test_an_owner_checked_save_needs_the_lease(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        held = store.claim(inst.id, "w1", TTL, T)
        assert held is not None
        with pytest.raises(ConcurrencyConflict) as err:
            store.save(held, started(held, T + 1), "w2", owner="w2")
        assert "the lease is now held by w1" in str(err.value)
        assert store.load(inst.id).version == held.version
        saved = store.save(held, started(held, T + 1), "w1", owner="w1")
        assert store.load(inst.id).lease_owner == "w1"
        done = store.save(
            saved,
            record_failure(saved, build_saga("cpr"), T + 2, fail(), 0.5),
            "w1",
            owner="w1",
            release=True,
        )
        assert (done.lease_owner, done.lease_expires_at) == (None, None)
        assert store.load(inst.id) == done

    def test_an_owner_checked_save_after_losing_the_lease(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        held = store.claim(inst.id, "w1", TTL, T)
        assert held is not None
        assert store.claim(inst.id, "w2", TTL, T + TTL + 1) is not None  # w1's lease expired
        with pytest.raises(ConcurrencyConflict, match="held by w2"):
            store.save(held, started(held, T + TTL + 2), "w1", owner="w1")

    def test_dead_letter_and_operator_record_are_written_with_the_state(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        parked = replace(inst, state=SagaState.FAILED, updated_at=T + 1)
        letter = DeadLetter(0, Phase.ACTION, "boom", "Traceback ...", 3)
        failed = store.save(
            inst, Transition(parked, (Event(EventKind.DEAD_LETTERED, 0),), dead_letter=letter), "w1"
        )
        [dl] = Queries(store).dead_letters()
        assert (dl.saga_id, dl.step_name, dl.phase, dl.error, dl.traceback, dl.attempts) == (
            inst.id,
            "s0",
            "action",
            "boom",
            "Traceback ...",
            3,
        )
        running = replace(failed, state=SagaState.RUNNING, updated_at=T + 2)
        store.save(
            failed,
            Transition(running, (Event(EventKind.OPERATOR_RETRY, 0),), resolves_dead_letter=True),
            "operator:ann",
            operator=OperatorRecord("ann", "retry", "fixed the bug", origin=Origin.console("ann")),
        )
        assert Queries(store).dead_letters() == []
        [resolved] = Queries(store).dead_letters(open_only=False)
        assert (resolved.resolved_at, resolved.resolved_by, resolved.resolution) == (
            T + 2,
            "operator:ann",
            "retry",
        )
        [audit] = Queries(store).operator_actions()
        assert (
            audit.actor,
            audit.action,
            audit.reason,
            audit.state_before,
            audit.state_after,
            audit.version_before,
            audit.version_after,
            audit.origin,
            audit.origin_detail,
        ) == ("ann", "retry", "fixed the bug", "failed", "running", 2, 3, "console", "ann")

    @pytest.mark.parametrize(
        "fail_on",
        [
            "INSERT INTO saga_events",
            "INSERT INTO saga_dead_letters",
            "INSERT INTO saga_operator_actions",
        ],
    )
    def test_a_failure_after_the_update_writes_nothing(self, store: Store, fail_on: str) -> None:
        inst, _ = store.create(fresh(), "api")
        failed = replace(inst, state=SagaState.FAILED, updated_at=T + 1)
        failed = failed.with_step(replace(failed.steps[0], status=StepStatus.FAILED, error="boom"))
        tr = Transition(
            failed,
            (Event(EventKind.DEAD_LETTERED, 0, error="boom"),),
            dead_letter=DeadLetter(0, Phase.ACTION, "boom", None, 1),
        )
        statements: list[str] = []

        def explode(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)
            if statement.lstrip().startswith(fail_on):
                raise RuntimeError("the database went away mid-transaction")

        sa.event.listen(store.db, "before_cursor_execute", explode)
        try:
            with pytest.raises(RuntimeError, match="went away"):
                store.save(
                    inst, tr, "w1", operator=OperatorRecord("ann", "skip", "why", origin=IN_PROCESS)
                )
        finally:
            sa.event.remove(store.db, "before_cursor_execute", explode)
        assert any(s.lstrip().startswith("UPDATE saga_instances") for s in statements)
        assert store.load(inst.id) == inst  # state, version and steps unchanged
        assert count(store, t.events) == 1
        assert count(store, t.dead_letters) == 0
        assert count(store, t.operator_actions) == 0

    def test_a_caller_transaction_rolls_back_the_save_with_it(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        with pytest.raises(RuntimeError), store.transaction() as conn:
            store.save(inst, started(inst, T + 1), "w1", conn=conn)
            raise RuntimeError("the step failed after the save")
        assert store.load(inst.id) == inst
        assert count(store, t.events) == 1

    def test_append_events_leaves_the_instance_alone(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        note = Event(EventKind.RESULT_DISCARDED, 0, Phase.ACTION, 1, detail={"why": "late"})
        store.append_events(inst, [note], "w1", T + 9)
        assert store.load(inst.id) == inst
        last = Queries(store).timeline(inst.id)[-1]
        assert (last.kind, last.at, last.detail) == ("result_discarded", T + 9, {"why": "late"})

    # -- what a stored transition sets off happens after its commit ------------------

    @pytest.fixture
    def told(self, store_url: str) -> Iterator[tuple[Store, list[tuple[str, int]]]]:
        """A store that notes each transition it is told of: (instance id, version)."""
        seen: list[tuple[str, int]] = []
        store = open_store(
            store_url,
            on_transition=lambda old, new, evs: seen.append(
                (new.id, 0 if old is None else old.version + 1)
            ),
        )
        yield store, seen
        store.dispose()

    def test_a_transition_is_told_once_its_transaction_committed(
        self, told: tuple[Store, list[tuple[str, int]]]
    ) -> None:
        store, seen = told
        inst, _ = store.create(fresh(), "api")
        assert seen == [(inst.id, 0)]
        with store.transaction() as conn:
            store.save(inst, started(inst, T + 1), "w1", conn=conn)
            assert seen == [(inst.id, 0)]  # not before the commit
        assert seen == [(inst.id, 0), (inst.id, 2)]

    def test_a_rolled_back_transition_is_never_told(
        self, told: tuple[Store, list[tuple[str, int]]]
    ) -> None:
        store, seen = told
        inst, _ = store.create(fresh(), "api")
        other = fresh()
        with pytest.raises(RuntimeError), store.transaction() as conn:
            store.save(inst, started(inst, T + 1), "w1", conn=conn)
            store.create(other, "api", conn=conn)
            store.save_many([(other.instance, started(other.instance, T + 2))], "w1", conn)
            raise RuntimeError("the step failed after the saves")
        with pytest.raises(ConcurrencyConflict):
            store.save(replace(inst, version=7), started(inst, T + 3), "w1")
        assert seen == [(inst.id, 0)]
        assert store.load(inst.id) == inst

    def test_a_rolled_back_savepoint_forgets_what_it_stored(
        self, told: tuple[Store, list[tuple[str, int]]]
    ) -> None:
        store, seen = told
        one, _ = store.create(fresh(), "api")
        two, _ = store.create(fresh(), "api")
        with store.transaction() as conn:
            store.save(one, started(one, T + 1), "w1", conn=conn)
            with pytest.raises(RuntimeError), store.savepoint(conn):
                store.save(two, started(two, T + 1), "w1", conn=conn)
                raise RuntimeError("this attempt failed: undo its writes")
        assert seen == [(one.id, 0), (two.id, 0), (one.id, 2)]
        assert store.load(two.id) == two

    # -- save_many (a batch of recorded replies) -------------------------------------

    def test_save_many_stores_successive_changes_of_one_instance_and_others(
        self, store: Store
    ) -> None:
        one, _ = store.create(fresh(), "api")
        other, _ = store.create(fresh(), "api")
        defn = build_saga("cpr")
        begun = started(one, T + 1)
        after_begin = replace(begun.instance, version=one.version + 1)
        output = {"nested": [1, None, "é"], "text": 'it\'s "quoted"'}
        succeeded = record_success(after_begin, defn, T + 2, output)
        changes = [(one, begun), (after_begin, succeeded), (other, started(other, T + 3))]

        with store.transaction() as conn:
            saved = store.save_many(changes, "w1", conn)

        assert [s.version for s in saved] == [2, 3, 2]
        assert store.load(one.id) == saved[1]
        assert store.load(other.id) == saved[2]
        assert store.load(one.id).steps[0].output == output
        assert [(e.kind, e.at, e.actor) for e in Queries(store).timeline(one.id)] == [
            ("saga_started", T, "api"),
            ("attempt_started", T + 1, "w1"),
            ("attempt_succeeded", T + 2, "w1"),
        ]

    def test_save_many_refuses_the_whole_batch_when_one_moved_on(self, store: Store) -> None:
        fine, _ = store.create(fresh(), "api")
        moved, _ = store.create(fresh(), "api")
        store.save(moved, started(moved, T + 1), "w2")  # now at version 2
        changes = [(fine, started(fine, T + 2)), (moved, started(moved, T + 2))]

        with (
            pytest.raises(ConcurrencyConflict, match="1 of a batch moved on"),
            store.transaction() as conn,
        ):
            store.save_many(changes, "w1", conn)

        assert store.load(fine.id) == fine
        assert count(store, t.events, saga_id=fine.id) == 1

    def test_save_many_writes_a_dead_letter_with_the_state(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        parked = replace(inst, state=SagaState.FAILED, updated_at=T + 1)
        letter = DeadLetter(0, Phase.ACTION, "boom", None, 3)
        tr = Transition(parked, (Event(EventKind.DEAD_LETTERED, 0),), dead_letter=letter)

        with store.transaction() as conn:
            store.save_many([(inst, tr)], "w1", conn)

        assert store.load(inst.id).state is SagaState.FAILED
        [dl] = Queries(store).dead_letters()
        assert (dl.saga_id, dl.error, dl.attempts) == (inst.id, "boom", 3)

    # -- leases ---------------------------------------------------------------------

    def test_claim_takes_a_free_lease_once(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        held = store.claim(inst.id, "w1", TTL, T)
        assert held is not None
        assert (held.lease_owner, held.lease_expires_at) == ("w1", T + TTL)
        assert store.claim(inst.id, "w2", TTL, T + 1) is None
        assert store.claim(inst.id, "w2", TTL, T + TTL) is None  # expires after, not at, TTL
        again = store.claim(inst.id, "w2", TTL, T + TTL + 1)
        assert again is not None and again.lease_owner == "w2"

    def test_claim_skips_finished_and_unknown_instances(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        store.save(
            inst,
            Transition(
                replace(inst, state=SagaState.COMPLETED), (Event(EventKind.SAGA_COMPLETED),)
            ),
            "w1",
        )
        assert store.claim(inst.id, "w1", TTL, T) is None
        assert store.claim("nope", "w1", TTL, T) is None

    def test_claim_due_takes_due_work_and_expired_leases(self, store: Store) -> None:
        due, _ = store.create(fresh(at=T - 50), "api")
        later, _ = store.create(fresh(at=T + 1_000), "api")
        leased, _ = store.create(fresh(at=T - 40), "api")
        expired, _ = store.create(fresh(at=T + 5_000), "api")  # not due, but its owner died
        assert store.claim(leased.id, "w9", TTL, T - 40) is not None
        assert store.claim(expired.id, "w9", 10, T - 20) is not None
        done, _ = store.create(fresh(at=T - 60), "api")
        store.save(
            done,
            Transition(
                replace(done, state=SagaState.COMPENSATED), (Event(EventKind.SAGA_COMPENSATED),)
            ),
            "w1",
        )
        claimed = store.claim_due("w1", TTL, T, 10)
        assert sorted(claimed) == sorted([due.id, expired.id])
        assert store.load(due.id).lease_owner == "w1"
        assert store.load(expired.id).lease_expires_at == T + TTL
        assert store.load(later.id).lease_owner is None
        assert store.load(leased.id).lease_owner == "w9"
        assert store.claim_due("w2", TTL, T + 1, 10) == []  # nothing left for anyone else

    def test_claim_due_respects_the_limit_and_the_order(self, store: Store) -> None:
        ids = [store.create(fresh(at=T - 100 + i), "api")[0].id for i in range(5)]
        first = store.claim_due("w1", TTL, T, 2)
        assert first == ids[:2]
        rest = store.claim_due("w2", TTL, T, 10)
        assert rest == ids[2:]

    def test_claim_due_takes_only_the_sagas_the_caller_can_run(self, store: Store) -> None:
        mine, _ = store.create(fresh(at=T - 10), "api")
        other = fresh(at=T - 20)
        theirs, _ = store.create(
            replace(other, instance=replace(other.instance, saga_name="other")), "api"
        )
        assert store.claim_due("w1", TTL, T, 10, [("pure", 2)]) == []  # a version it lacks
        assert store.claim_due("w1", TTL, T, 10, [("pure", 1)]) == [mine.id]
        assert store.claim_due("w2", TTL, T, 10) == [theirs.id]

    def test_racing_claim_due_never_hands_one_instance_to_two_owners(self, store: Store) -> None:
        for i in range(40):
            store.create(fresh(at=T - i), "api")
        barrier = threading.Barrier(4)
        got: dict[str, list[str]] = {}

        def claim(owner: str) -> None:
            barrier.wait()
            mine: list[str] = []
            while batch := store.claim_due(owner, TTL, T, 3):
                mine += batch
            got[owner] = mine

        threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        every = [i for ids in got.values() for i in ids]
        assert len(every) == 40
        assert len(set(every)) == 40

    def test_renew_extends_only_the_leases_held(self, store: Store) -> None:
        a, _ = store.create(fresh(), "api")
        b, _ = store.create(fresh(), "api")
        store.claim(a.id, "w1", TTL, T)
        store.claim(b.id, "w2", TTL, T)
        assert store.renew("w1", [a.id, b.id], TTL, T + 5_000) == 1
        assert store.load(a.id).lease_expires_at == T + 5_000 + TTL
        assert store.load(b.id).lease_expires_at == T + TTL
        assert store.renew("w1", [], TTL, T) == 0

    def test_a_renewed_lease_is_not_taken_over(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        store.claim(inst.id, "w1", TTL, T)
        store.renew("w1", [inst.id], TTL, T + TTL - 1)
        assert store.claim(inst.id, "w2", TTL, T + TTL + 1) is None
        assert store.claim_due("w2", TTL, T + TTL + 1, 10) == []

    def test_release_is_for_the_owner_only(self, store: Store) -> None:
        inst, _ = store.create(fresh(), "api")
        store.claim(inst.id, "w1", TTL, T)
        store.release(inst.id, "w2")
        assert store.load(inst.id).lease_owner == "w1"
        store.release(inst.id, "w1")
        assert store.load(inst.id).lease_owner is None
        assert store.claim(inst.id, "w2", TTL, T + 1) is not None

    def test_a_held_lease_is_not_claimed_again_by_its_own_owner(self, store: Store) -> None:
        # Two threads of one worker must not both advance an instance: the
        # second claim (a doorbell racing the poll) has to come back empty.
        inst, _ = store.create(fresh(), "api")
        assert store.claim(inst.id, "w1", TTL, T) is not None
        assert store.claim(inst.id, "w1", TTL, T + 1) is None

    # -- schema ---------------------------------------------------------------------

    def test_the_migrations_build_exactly_the_schema_metadata(self, store_url: str) -> None:
        db = open_store(store_url).db
        try:
            with db.connect() as conn:
                # Judge the store's own tables only: participants of examples and
                # tests keep theirs in the same database.
                ours = {tb.name for tb in metadata.sorted_tables}
                ctx = MigrationContext.configure(
                    conn,
                    opts={
                        "include_name": lambda name, kind, _p: kind != "table" or name in ours,
                    },
                )
                diff = compare_metadata(ctx, metadata)
        finally:
            db.dispose()
        assert diff == []
