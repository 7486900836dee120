"""The operations API and bad input at the engine's edge, on a real store.

Each operator action is recorded in the audit table with actor, reason,
states and versions; a refused one (wrong state, stale version, bad input)
raises a clear error and writes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine import (
    NO_RETRY,
    Action,
    ConcurrencyConflict,
    InvalidInput,
    InvalidTransition,
    Retry,
    SagaEngine,
    SagaNotFound,
    SagaState,
    StepStatus,
    UnknownSaga,
)
from engine.model import Instance
from engine.queries import Queries
from engine.states import CompensationStatus
from engine.store import schema as t
from tests.helpers.engines import Engines, timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.sagas import travel

SLOW = Retry(max_attempts=3, initial_delay=timedelta(minutes=10), jitter=0.0)


@pytest.fixture
def engine(engines: Engines, participant: Participant) -> SagaEngine:
    """Travel with no retries (so inline runs end at once) and a slow-retrying twin."""
    return engines(
        travel(participant, retry=NO_RETRY, comp_retry=NO_RETRY),
        travel(participant, retry=SLOW, name="patient"),
    )


def dead_lettered(engine: SagaEngine, tmp_path: Path) -> Instance:
    """A travel saga whose flight compensation failed: state failed, waiting for an operator."""
    fault = tmp_path / "fault"
    fault.touch()
    inst = engine.run(
        "travel", {"fail": {"car": "always"}, "comp_fail_while": {"flight": str(fault)}}
    )
    assert inst.state is SagaState.FAILED
    fault.unlink()
    return inst


def waiting(engine: SagaEngine) -> Instance:
    """A saga whose flight failed once and waits ten minutes for its retry."""
    inst = engine.run("patient", {"fail": {"flight": 1}})
    assert inst.state is SagaState.RUNNING and inst.cursor == 1
    return inst


def snapshot(engine: SagaEngine, saga_id: str) -> tuple[Any, ...]:
    """Everything an operation could write, to prove a refusal wrote nothing."""
    with engine.store.db.connect() as conn:
        counts = tuple(
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
            for table in (t.events, t.operator_actions, t.dead_letters)
        )
        open_letters = conn.execute(
            sa.select(sa.func.count())
            .select_from(t.dead_letters)
            .where(t.dead_letters.c.resolved_at.is_(None))
        ).scalar()
    return engine.get(saga_id), counts, open_letters


def audit(engine: SagaEngine, saga_id: str) -> list[tuple[Any, ...]]:
    return [
        (
            a.actor,
            a.action,
            a.reason,
            a.state_before,
            a.state_after,
            a.version_before,
            a.version_after,
            a.step_name,
        )
        for a in reversed(Queries(engine.store).operator_actions(saga_id=saga_id))
    ]


# -- each action, recorded ------------------------------------------------------------


def test_retry_is_audited_and_resumes_the_saga(engine: SagaEngine, tmp_path: Path) -> None:
    inst = dead_lettered(engine, tmp_path)
    after = engine.operations.retry(
        inst.id, actor="ann", reason="refund API fixed", expected_version=inst.version
    )
    assert after.state is SagaState.COMPENSATING
    assert after.version == inst.version + 1
    assert audit(engine, inst.id) == [
        (
            "ann",
            "retry",
            "refund API fixed",
            "failed",
            "compensating",
            inst.version,
            inst.version + 1,
            "flight",
        )
    ]
    event = timeline(engine, inst.id)[-1]
    assert (event.kind, event.actor, event.step_name) == (
        "operator_retry",
        "operator:ann",
        "flight",
    )
    assert Queries(engine.store).dead_letters(saga_id=inst.id) == []
    worker = engine.worker(2).start()
    try:
        done = wait_state(engine, inst.id, SagaState.COMPENSATED)
    finally:
        worker.stop()
    assert done.steps[0].comp_status is CompensationStatus.COMPENSATED


def test_skip_is_audited_and_goes_on(engine: SagaEngine, tmp_path: Path) -> None:
    inst = dead_lettered(engine, tmp_path)
    after = engine.operations.skip(inst.id, actor="bob", reason="refunded by phone")
    assert after.steps[1].comp_status is CompensationStatus.SKIPPED
    assert after.state is SagaState.COMPENSATING
    assert audit(engine, inst.id) == [
        (
            "bob",
            "skip",
            "refunded by phone",
            "failed",
            "compensating",
            inst.version,
            inst.version + 1,
            "flight",
        )
    ]


def test_force_compensate_is_audited(engine: SagaEngine) -> None:
    inst = waiting(engine)
    after = engine.operations.compensate(inst.id, actor="cy", reason="customer cancelled")
    assert after.state is SagaState.COMPENSATING
    assert after.steps[1].comp_status is CompensationStatus.PENDING  # its action started
    assert audit(engine, inst.id) == [
        (
            "cy",
            "compensate",
            "customer cancelled",
            "running",
            "compensating",
            inst.version,
            inst.version + 1,
            "flight",
        )
    ]
    assert timeline(engine, inst.id)[-2].kind == "operator_compensate"


def test_cancel_is_audited(engine: SagaEngine) -> None:
    inst = waiting(engine)
    after = engine.operations.cancel(inst.id, actor="dee", reason="duplicate booking")
    assert after.state is SagaState.CANCELLED
    assert after.next_run_at is None
    assert audit(engine, inst.id) == [
        (
            "dee",
            "cancel",
            "duplicate booking",
            "running",
            "cancelled",
            inst.version,
            inst.version + 1,
            "flight",
        )
    ]


def test_retry_now_skips_the_backoff(engine: SagaEngine) -> None:
    inst = waiting(engine)
    assert inst.next_run_at is not None
    after = engine.operations.retry(inst.id, actor="ann", reason="the airline is back")
    assert after.next_run_at is not None and after.next_run_at < inst.next_run_at
    worker = engine.worker(2).start()
    try:
        done = wait_state(engine, inst.id, SagaState.COMPLETED)
    finally:
        worker.stop()
    assert done.steps[1].attempts == 2


def test_allowed_lists_the_actions_the_state_permits(engine: SagaEngine, tmp_path: Path) -> None:
    assert engine.operations.allowed(waiting(engine)) == list(Action)
    assert engine.operations.allowed(dead_lettered(engine, tmp_path)) == [
        Action.RETRY,
        Action.SKIP,
        Action.CANCEL,
    ]
    assert engine.operations.allowed(engine.run("travel", {})) == []


# -- refusals write nothing -------------------------------------------------------------

Operation = Callable[..., Instance]


@pytest.mark.parametrize("action", list(Action))
def test_every_action_on_a_completed_saga_is_refused(engine: SagaEngine, action: Action) -> None:
    inst = engine.run("travel", {})
    before = snapshot(engine, inst.id)
    with pytest.raises(InvalidTransition) as err:
        engine.operations.act(action, inst.id, actor="ann", reason="why not")
    assert f"saga {inst.id} while it is completed: it has already finished" in str(err.value)
    assert snapshot(engine, inst.id) == before


def test_force_compensate_while_compensating_is_refused(engine: SagaEngine, tmp_path: Path) -> None:
    inst = dead_lettered(engine, tmp_path)
    before = snapshot(engine, inst.id)
    with pytest.raises(InvalidTransition, match="retry or skip the compensation"):
        engine.operations.compensate(inst.id, actor="ann", reason="undo it all")
    assert snapshot(engine, inst.id) == before


def test_a_stale_version_is_refused_and_nothing_is_applied(
    engine: SagaEngine, tmp_path: Path
) -> None:
    inst = dead_lettered(engine, tmp_path)
    engine.operations.skip(inst.id, actor="bob", reason="done by hand")
    before = snapshot(engine, inst.id)
    with pytest.raises(ConcurrencyConflict) as err:
        engine.operations.retry(
            inst.id, actor="ann", reason="retry it", expected_version=inst.version
        )
    assert (err.value.expected, err.value.actual) == (inst.version, inst.version + 1)
    assert "reload it and decide again" in str(err.value)
    assert snapshot(engine, inst.id) == before
    assert [a[1] for a in audit(engine, inst.id)] == ["skip"]


@pytest.mark.parametrize("reason", ["", "   ", None, "x" * 2001])
def test_a_missing_or_oversized_reason_is_refused(engine: SagaEngine, reason: str | None) -> None:
    inst = waiting(engine)
    before = snapshot(engine, inst.id)
    with pytest.raises(InvalidInput) as err:
        engine.operations.cancel(inst.id, actor="ann", reason=reason)  # type: ignore[arg-type]
    assert err.value.field == "reason"
    assert snapshot(engine, inst.id) == before


@pytest.mark.parametrize("actor", ["", "  ", "x" * 151])
def test_a_missing_actor_is_refused(engine: SagaEngine, actor: str) -> None:
    inst = waiting(engine)
    before = snapshot(engine, inst.id)
    with pytest.raises(InvalidInput) as err:
        engine.operations.cancel(inst.id, actor=actor, reason="because")
    assert err.value.field == "actor"
    assert snapshot(engine, inst.id) == before


def test_an_operator_racing_a_worker_wins_and_the_late_result_is_discarded(
    engines: Engines, participant: Participant, tmp_path: Path
) -> None:
    engine = engines(travel(participant))
    engines.worker(engine)
    gate = tmp_path / "hotel-busy"
    gate.touch()
    started = engine.start("travel", {"block_while": {"hotel": str(gate)}})
    wait_for(lambda: participant.effects(started.id))  # the hotel acted and now blocks
    in_flight = engine.get(started.id)
    assert in_flight.steps[0].status is StepStatus.RUNNING
    cancelled = engine.operations.cancel(
        started.id, actor="ann", reason="stop it", expected_version=in_flight.version
    )
    gate.unlink()
    done = wait_state(engine, started.id, SagaState.CANCELLED)
    assert done.version == cancelled.version  # the worker's stale result changed nothing
    assert done.steps[0].status is StepStatus.TIMED_OUT
    assert "result_discarded" in [e.kind for e in timeline(engine, started.id)]
    assert participant.effects(started.id) == [("hotel", "action")]


# -- bad input at the engine's edge --------------------------------------------------------


def nothing_written(engine: SagaEngine) -> bool:
    with engine.store.db.connect() as conn:
        return all(
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
            for table in (t.instances, t.steps, t.events)
        )


@pytest.mark.parametrize(
    "payload",
    [
        {"when": object()},
        {"amount": float("nan")},
        {"tags": {1, 2}},
        b"bytes",
        {"amount": float("inf")},
    ],
)
@pytest.mark.parametrize("how", ["start", "run"])
def test_a_payload_that_is_not_json_is_refused(engine: SagaEngine, payload: Any, how: str) -> None:
    with pytest.raises(InvalidInput) as err:
        getattr(engine, how)("travel", payload)
    assert "JSON" in str(err.value)
    assert nothing_written(engine)


@pytest.mark.parametrize("note", ["a\x00b", "lone \ud800 surrogate", {"\udfff": 1}])
def test_a_payload_with_text_no_store_can_keep_is_refused_on_every_store(
    engine: SagaEngine, note: Any
) -> None:
    # PostgreSQL's JSONB cannot hold U+0000 (SQLite could), and no store keeps a lone
    # surrogate: refused everywhere, up front, never a raw database error.
    with pytest.raises(InvalidInput, match="JSON"):
        engine.start("travel", {"note": note})
    assert nothing_written(engine)
    assert engine.start("travel", {"note": "an emoji \U0001f600 is fine"}).created


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("idempotency key", {"idempotency_key": ""}),
        ("business key", {"business_key": "k" * 201}),
        ("correlation id", {"correlation_id": "   "}),
        ("correlation id", {"correlation_id": 42}),
        # PostgreSQL's text holds no U+0000 and no store can encode a lone surrogate:
        # refused up front on every store, never a raw database error.
        ("business key", {"business_key": "trip\x00-1"}),
        ("correlation id", {"correlation_id": "\x00"}),
        ("idempotency key", {"idempotency_key": "key\x00"}),
        ("business key", {"business_key": "trip-\ud800"}),
    ],
)
@pytest.mark.parametrize("how", ["start", "run"])
def test_malformed_keys_are_refused(
    engine: SagaEngine, field: str, kwargs: dict[str, Any], how: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        getattr(engine, how)("travel", {}, **kwargs)
    assert err.value.field == field
    assert nothing_written(engine)


def test_an_unknown_saga_name_is_refused(engine: SagaEngine) -> None:
    with pytest.raises(UnknownSaga) as err:
        engine.start("travle", {})
    assert "unknown saga 'travle'; registered sagas: patient, travel" in str(err.value)
    with pytest.raises(UnknownSaga):
        engine.run("travle", {})
    assert isinstance(err.value, LookupError)
    assert nothing_written(engine)


@pytest.mark.parametrize("call", ["get", "retry", "skip", "compensate", "cancel"])
def test_an_unknown_id_is_refused(engine: SagaEngine, call: str) -> None:
    with pytest.raises(SagaNotFound, match="no saga instance with id 'no-such-id'"):
        if call == "get":
            engine.get("no-such-id")
        else:
            getattr(engine.operations, call)("no-such-id", actor="ann", reason="why")
    assert nothing_written(engine)


def test_force_compensate_racing_a_worker_undoes_the_step_in_flight(
    engines: Engines, participant: Participant, tmp_path: Path
) -> None:
    engine = engines(travel(participant))
    engines.worker(engine)
    gate = tmp_path / "hotel-busy"
    gate.touch()
    started = engine.start("travel", {"block_while": {"hotel": str(gate)}})
    wait_for(lambda: participant.effects(started.id))
    engine.operations.compensate(started.id, actor="ann", reason="customer changed their mind")
    gate.unlink()
    done = wait_state(engine, started.id, SagaState.COMPENSATED)
    assert done.steps[0].comp_status is CompensationStatus.COMPENSATED
    assert participant.effects(started.id) == [("hotel", "action"), ("hotel", "compensate")]


def test_racing_operators_on_one_instance_apply_exactly_one_action(engine: SagaEngine) -> None:
    inst = waiting(engine)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def cancel(n: int) -> None:
        barrier.wait()
        try:
            engine.operations.cancel(inst.id, actor=f"op{n}", reason="racing")
            outcomes.append("applied")
        except (ConcurrencyConflict, InvalidTransition) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=cancel, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert outcomes.count("applied") == 1
    assert len(audit(engine, inst.id)) == 1
    assert engine.get(inst.id).version == inst.version + 1
