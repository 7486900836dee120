"""SIGTERM drains: ``saga worker`` and ``saga participant`` as real processes.

A draining worker takes no new work, lets the step in hand finish and
records it, begins nothing after it, releases its leases and exits 0. A
draining participant finishes the command in hand and replies before it
exits 0. What either left due is finished by the next process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import SagaEngine, SagaState, Settings
from engine.states import StepStatus
from tests.conftest import empty_tables
from tests.helpers.engines import timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.procs import Processes, participant, worker
from tests.helpers.remote import remote_travel
from tests.helpers.sagas import travel

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

APP = "tests.helpers.proc_app"


@pytest.fixture
def recorder(pg_url: str) -> Iterator[Participant]:
    empty_tables(pg_url)
    p = Participant(pg_url)
    yield p
    p.close()


@pytest.fixture
def procs(pg_url: str, tmp_path: Path, recorder: Participant) -> Iterator[Processes]:
    made = Processes(tmp_path, {"SAGA_DATABASE_URL": pg_url, "SAGA_REDIS_URL": ""})
    yield made
    made.close()


@pytest.fixture
def starter(pg_url: str, recorder: Participant) -> Iterator[SagaEngine]:
    # Starts sagas and reads the store; it runs nothing itself.
    engine = SagaEngine(
        [travel(recorder)], settings=Settings(database_url=pg_url, worker_id="starter")
    )
    yield engine
    engine.close()


def test_sigterm_finishes_the_step_in_hand_records_it_and_exits_0(
    procs: Processes, starter: SagaEngine, recorder: Participant, tmp_path: Path
) -> None:
    gate = tmp_path / "hold-hotel"
    gate.touch()
    worker(procs, "w1", APP)
    in_hand = starter.start("travel", {"block_while": {"hotel": str(gate)}}).id
    wait_for(lambda: recorder.effects(in_hand))  # the hotel step runs and holds

    procs.running["w1"].terminate()  # SIGTERM
    procs.wait_for_line("w1", "draining")
    late = starter.start("travel", {}).id  # due now, but the worker takes no new work
    gate.unlink()
    assert procs.running.pop("w1").wait(30) == 0

    drained = starter.get(in_hand)
    assert drained.steps[0].status is StepStatus.SUCCEEDED  # finished and recorded
    assert drained.steps[1].attempts == 0  # nothing begun after it
    assert drained.lease_owner is None and drained.state is SagaState.RUNNING
    assert starter.get(late).steps[0].attempts == 0
    assert [e.kind for e in timeline(starter, late)] == ["saga_started"]
    assert "Traceback" not in procs.log("w1")

    worker(procs, "w2", APP)  # the next worker finishes what was left due
    wait_state(starter, in_hand, SagaState.COMPLETED)
    wait_state(starter, late, SagaState.COMPLETED)
    assert set(recorder.effect_counts().values()) == {1}


def test_sigterm_on_an_idle_worker_exits_0_at_once(procs: Processes) -> None:
    worker(procs, "idle", APP)
    assert procs.terminate("idle", timeout=15) == 0
    assert "stopped" in procs.log("idle")


@pytest.mark.redis
def test_sigterm_on_a_participant_replies_to_the_command_in_hand_first(
    procs: Processes, recorder: Participant, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    redis_env = {"SAGA_REDIS_URL": redis_url, "SAGA_REDIS_PREFIX": f"drain-{tmp_path.name}"}
    procs.env.update(redis_env)
    gate = tmp_path / "hold-hotel"
    gate.touch()
    worker(procs, "w1", APP)
    participant(procs, "p1", APP)
    engine = SagaEngine(
        [remote_travel(timeout=5.0)],
        settings=Settings(
            database_url=pg_url,
            worker_id="starter",
            redis_url=redis_url,
            redis_prefix=redis_env["SAGA_REDIS_PREFIX"],
        ),
    )
    try:
        saga_id = engine.start("rtravel", {"block_while": {"hotel": str(gate)}}).id
        wait_for(lambda: recorder.effects(saga_id))  # the hotel command is in hand

        procs.running["p1"].terminate()
        procs.wait_for_line("p1", "draining")
        gate.unlink()
        assert procs.running.pop("p1").wait(30) == 0

        wait_for(lambda: engine.get(saga_id).steps[0].status is StepStatus.SUCCEEDED)
        participant(procs, "p2", APP)
        wait_state(engine, saga_id, SagaState.COMPLETED)
        hotel = [c for c in recorder.calls(saga_id) if c.step == "hotel"]
        assert [(c.attempt, c.outcome) for c in hotel] == [(1, "returned")]
        assert set(recorder.effect_counts().values()) == {1}
    finally:
        engine.close()
