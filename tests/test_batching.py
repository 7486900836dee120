"""Transactional steps share a transaction; a failing one is recorded against itself.

A batch first runs without savepoints; when a step raises, the batch is
rolled back and run again with a savepoint around each attempt. A step whose
attempts keep raising starts inside a savepoint, and only that step: its saga's
steps stop running twice, and the others pay no savepoint.
"""

from __future__ import annotations

import sqlalchemy as sa

from engine import NonRetryableError, Saga, SagaEngine, SagaState, Settings, StepContext


def _engine(url: str, calls: dict[str, int]) -> SagaEngine:
    saga = Saga("charges")

    def note(step: str) -> None:
        calls[step] = calls.get(step, 0) + 1

    def reserve(ctx: StepContext) -> None:
        note("reserve")
        assert ctx.connection is not None
        ctx.connection.execute(
            sa.text("INSERT INTO held (key) VALUES (:k)"), {"k": ctx.idempotency_key}
        )

    def release(ctx: StepContext, _out: object) -> None:
        note("release")
        assert ctx.connection is not None
        ctx.connection.execute(
            sa.text("DELETE FROM held WHERE key = :k"), {"k": f"{ctx.saga_id}:reserve:action"}
        )

    def charge(ctx: StepContext) -> None:
        note("charge")
        raise NonRetryableError("card declined")

    saga.add_step("reserve", reserve, release, transactional=True)
    saga.add_step("charge", charge, transactional=True)
    engine = SagaEngine([saga], settings=Settings(database_url=url))
    with engine.store.transaction() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS held (key VARCHAR(200) PRIMARY KEY)"))
    return engine


def test_a_failing_batch_compensates_and_leaves_nothing_behind(store_url: str) -> None:
    calls: dict[str, int] = {}
    engine = _engine(store_url, calls)
    try:
        inst = engine.run("charges", {})
        assert inst.state is SagaState.COMPENSATED
        steps = engine.store.load(inst.id).steps
        assert [(s.status, s.comp_status) for s in steps] == [
            ("succeeded", "compensated"),
            ("failed", "not_needed"),
        ]
        with engine.store.transaction() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM held")).scalar() == 0
        # Optimistic pass (rolled back) and the pass with savepoints: each ran once.
        assert calls == {"reserve": 2, "charge": 2, "release": 1}
    finally:
        engine.close()


def test_a_saga_type_that_keeps_failing_starts_with_savepoints(store_url: str) -> None:
    calls: dict[str, int] = {}
    engine = _engine(store_url, calls)
    try:
        for _ in range(8):
            calls.clear()
            assert engine.run("charges", {}).state is SagaState.COMPENSATED
        assert calls == {"reserve": 1, "charge": 1, "release": 1}
    finally:
        engine.close()


def test_only_the_step_that_keeps_failing_gets_a_savepoint(store_url: str) -> None:
    calls: dict[str, int] = {}
    engine = _engine(store_url, calls)
    statements: list[str] = []

    def note(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement.split(maxsplit=1)[0].upper())

    try:
        for _ in range(8):
            engine.run("charges", {})
        sa.event.listen(engine.store.db, "before_cursor_execute", note)
        calls.clear()
        assert engine.run("charges", {}).state is SagaState.COMPENSATED
        assert calls == {"reserve": 1, "charge": 1, "release": 1}
        # One savepoint, around the charge: the reserve and its release run bare.
        assert statements.count("SAVEPOINT") == 1
        assert statements.count("ROLLBACK") == 1  # to that savepoint: the charge raised
    finally:
        sa.event.remove(engine.store.db, "before_cursor_execute", note)
        engine.close()
