"""Steps that wait for an external event (a signal), with a deadline.

The approval saga (tests/helpers/remote.py) books a hotel through a remote
participant, waits for ``manager_approval``, then rents a car. Signals come
through ``engine.signal`` and ``saga signal``; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from engine import InvalidInput, InvalidTransition, Retry, SagaEngine, SagaNotFound, SagaState
from engine.cli import main
from engine.cli.context import shell_origin
from engine.queries import Queries
from engine.states import StepStatus
from engine.store import schema as t
from tests.helpers.deploy import Deployment
from tests.helpers.engines import timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.remote import approval, service

APPROVAL = 1  # the waiting step's index


@pytest.fixture
def deployment(store_url: str, participant: Participant) -> Iterator[Deployment]:
    # Depends on the participant so that it is closed after the handlers stopped.
    made = Deployment(store_url)
    yield made
    made.close()


def running(deployment: Deployment, participant: Participant, **options: Any) -> SagaEngine:
    engine = deployment.engine(approval(**options))
    deployment.participant(engine, service(participant))
    deployment.worker(engine)
    return engine


def waiting(engine: SagaEngine, saga_id: str) -> bool:
    inst = engine.get(saga_id)
    return inst.cursor == APPROVAL and inst.steps[APPROVAL].status is StepStatus.RUNNING


def signal_rows(engine: SagaEngine) -> list[Any]:
    with engine.store.db.connect() as conn:
        return list(conn.execute(sa.select(t.signals)))


def test_a_signal_completes_the_waiting_step(
    deployment: Deployment, participant: Participant
) -> None:
    engine = running(deployment, participant)
    saga_id = engine.start("approval", {}).id
    wait_for(lambda: waiting(engine, saga_id))

    delivered = engine.signal(saga_id, "manager_approval", {"by": "Grace"}, sent_by="grace")

    assert delivered.taken
    assert delivered.instance.steps[APPROVAL].status is StepStatus.SUCCEEDED
    done = wait_state(engine, saga_id, SagaState.COMPLETED)
    assert done.steps[APPROVAL].output == {"by": "Grace"}
    [received] = [e for e in timeline(engine, saga_id) if e.kind == "signal_received"]
    assert received.step_name == "manager_approval" and received.actor == "signal:grace"
    # sent_by is the caller's claim; the origin is the door: here the engine's API in-process.
    assert received.detail == {
        "event": "manager_approval",
        "sent_by": "grace",
        "origin": "engine",
        "taken": True,
    }
    [row] = signal_rows(engine)
    assert (row.saga_id, row.event, row.data, row.sent_by) == (
        saga_id,
        "manager_approval",
        {"by": "Grace"},
        "grace",
    )


def test_an_early_signal_is_kept_until_the_step_waits(
    deployment: Deployment, participant: Participant, tmp_path: Path
) -> None:
    gate = tmp_path / "hold-hotel"
    gate.touch()
    engine = running(deployment, participant)
    saga_id = engine.start("approval", {"block_while": {"hotel": str(gate)}}).id
    wait_for(lambda: participant.effects(saga_id))  # the hotel step is still running

    delivered = engine.signal(saga_id, "manager_approval", {"early": True})
    gate.unlink()

    assert not delivered.taken
    done = wait_state(engine, saga_id, SagaState.COMPLETED)
    assert done.steps[APPROVAL].output == {"early": True}
    assert done.steps[APPROVAL].attempts == 1


def test_a_signal_moves_the_saga_on_with_no_worker_running(
    deployment: Deployment, participant: Participant
) -> None:
    engine = deployment.engine(approval())
    deployment.participant(engine, service(participant))
    worker = deployment.worker(engine)
    saga_id = engine.start("approval", {}).id
    wait_for(lambda: waiting(engine, saga_id))
    worker.stop()

    inst = engine.signal(saga_id, "manager_approval").instance

    assert (inst.cursor, inst.state, inst.steps[APPROVAL].output) == (2, SagaState.RUNNING, None)
    deployment.worker(engine)
    wait_state(engine, saga_id, SagaState.COMPLETED)


def test_a_wait_past_its_deadline_times_out_and_the_saga_compensates(
    deployment: Deployment, participant: Participant
) -> None:
    engine = running(deployment, participant, timeout=0.3)
    saga_id = engine.start("approval", {}).id

    done = wait_state(engine, saga_id, SagaState.COMPENSATED)

    assert done.steps[APPROVAL].status is StepStatus.TIMED_OUT
    assert "no 'manager_approval' signal arrived within 0.3s" in (done.steps[APPROVAL].error or "")
    assert participant.effects(saga_id) == [("hotel", "action"), ("hotel", "compensate")]
    with pytest.raises(InvalidTransition, match="the saga is compensated"):
        engine.signal(saga_id, "manager_approval")
    assert signal_rows(engine) == []


def test_a_wait_with_retries_waits_again_after_a_timeout(
    deployment: Deployment, participant: Participant
) -> None:
    twice = Retry(max_attempts=2, initial_delay=timedelta(milliseconds=10))
    engine = running(deployment, participant, timeout=0.3, retry=twice)
    saga_id = engine.start("approval", {}).id
    wait_for(lambda: engine.get(saga_id).steps[APPROVAL].attempts == 2 and waiting(engine, saga_id))

    assert engine.signal(saga_id, "manager_approval", "ok").taken

    done = wait_state(engine, saga_id, SagaState.COMPLETED)
    assert done.steps[APPROVAL].output == "ok"
    kinds = [e.kind for e in timeline(engine, saga_id) if e.step_name == "manager_approval"]
    assert kinds[:3] == ["attempt_started", "attempt_timed_out", "attempt_started"]


def test_signals_that_cannot_be_taken_are_refused_and_nothing_is_written(
    deployment: Deployment, participant: Participant
) -> None:
    engine = running(deployment, participant)
    saga_id = engine.start("approval", {}).id
    wait_for(lambda: waiting(engine, saga_id))
    before = len(timeline(engine, saga_id))

    with pytest.raises(InvalidTransition, match="it waits for 'manager_approval'"):
        engine.signal(saga_id, "hr_approval")
    with pytest.raises(InvalidInput, match="JSON"):
        engine.signal(saga_id, "manager_approval", {"when": object()})
    with pytest.raises(SagaNotFound):
        engine.signal("0190a000-0000-7000-8000-000000000000", "manager_approval")
    assert len(timeline(engine, saga_id)) == before and signal_rows(engine) == []

    engine.signal(saga_id, "manager_approval", {"n": 1})
    # The step took the first one (and the saga may have finished since).
    with pytest.raises(InvalidTransition, match=r"already ended|the saga is completed"):
        engine.signal(saga_id, "manager_approval", {"n": 2})
    assert [row.data for row in signal_rows(engine)] == [{"n": 1}]


def test_a_second_early_signal_for_the_same_event_is_refused(
    deployment: Deployment, participant: Participant, tmp_path: Path
) -> None:
    gate = tmp_path / "hold-hotel"
    gate.touch()
    engine = running(deployment, participant)
    saga_id = engine.start("approval", {"block_while": {"hotel": str(gate)}}).id
    engine.signal(saga_id, "manager_approval", 1)

    with pytest.raises(InvalidTransition, match="already stored"):
        engine.signal(saga_id, "manager_approval", 2)
    gate.unlink()
    assert wait_state(engine, saga_id, SagaState.COMPLETED).steps[APPROVAL].output == 1


# -- the command line ----------------------------------------------------------------


def test_saga_signal_delivers_an_event_from_the_command_line(
    deployment: Deployment, participant: Participant, store_url: str
) -> None:
    engine = running(deployment, participant)
    saga_id = engine.start("approval", {}).id
    wait_for(lambda: waiting(engine, saga_id))
    env = {"SAGA_DATABASE_URL": store_url, "SAGA_REDIS_URL": ""}
    argv = ["-A", "tests.helpers.approval_app", "signal", saga_id, "manager_approval"]

    result = CliRunner().invoke(main, [*argv, "--data", '{"ok": true}', "--json"], env=env)

    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["event"], doc["taken"], doc["instance"]["id"]) == (
        "manager_approval",
        True,
        saga_id,
    )
    assert wait_state(engine, saga_id, SagaState.COMPLETED).steps[APPROVAL].output == {"ok": True}

    again = CliRunner().invoke(main, argv, env=env)
    assert again.exit_code == 4
    assert "the saga is completed" in again.output
    missing = CliRunner().invoke(
        main, [*argv[:3], "0190a000-0000-7000-8000-000000000000", "manager_approval"], env=env
    )
    assert missing.exit_code == 3
    bad = CliRunner().invoke(main, [*argv, "--data", "{nope"], env=env)
    assert bad.exit_code == 2 and "--data" in bad.output


def test_a_signal_sent_with_a_reason_is_an_audited_operator_action(
    deployment: Deployment, participant: Participant, store_url: str
) -> None:
    engine = running(deployment, participant)
    saga_id = engine.start("approval", {}).id
    wait_for(lambda: waiting(engine, saga_id))
    env = {"SAGA_DATABASE_URL": store_url, "SAGA_REDIS_URL": ""}
    argv = ["-A", "tests.helpers.approval_app", "signal", saga_id, "manager_approval"]

    blank = CliRunner().invoke(main, [*argv, "--sent-by", "ann", "--reason", "  "], env=env)
    result = CliRunner().invoke(
        main, [*argv, "--sent-by", "ann", "--reason", "approved on the phone"], env=env
    )

    assert blank.exit_code == 2 and "reason" in blank.output
    assert result.exit_code == 0, result.output
    [audit] = Queries(engine.store).operator_actions(saga_id=saga_id)
    assert (audit.actor, audit.action, audit.reason, audit.step_name) == (
        "ann",
        "signal",
        "approved on the phone",
        "manager_approval",
    )
    assert audit.detail == {"event": "manager_approval", "data": None, "taken": True}
    # "ann" is what --sent-by claims; the origin is the account and host that ran saga.
    assert (audit.origin, audit.origin_detail) == ("cli", shell_origin().detail)
    [received] = [e for e in timeline(engine, saga_id) if e.kind == "signal_received"]
    assert received.detail is not None and received.detail["origin"] == str(shell_origin())
