"""Remote steps: commands to participant services and their replies.

In-process (the embedded default, on SQLite and PostgreSQL) and on Redis
Streams with PostgreSQL. The participants record every call and effect
(tests/helpers/participant.py), so each test can check that an effect
happened once however often a command was delivered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner

from engine import (
    DefinitionError,
    Retry,
    Saga,
    SagaEngine,
    SagaState,
    Settings,
    StepContext,
    metrics,
)
from engine.cli import main
from engine.decide import record_success
from engine.definition import Remote
from engine.errors import ConcurrencyConflict
from engine.model import now_ms
from engine.queries import EventRecord
from engine.remote.dispatch import resend_in_flight
from engine.remote.messages import BadMessage, Command, Outcome, Reply
from engine.remote.participant import ParticipantService
from engine.remote.replies import Handled, ReplyHandler, ReplyListener
from engine.states import Phase
from engine.transport.commands import PARTICIPANTS, WORKERS, CommandBus, InProcessBus
from engine.transport.redis_streams import RedisStreams
from examples import remote_participants, travel_booking_remote
from tests.conftest import empty_tables
from tests.helpers.deploy import Deployment
from tests.helpers.engines import timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.remote import STEPS, remote_travel, service
from tests.helpers.sagas import QUICK


@pytest.fixture
def embedded(store_url: str, participant: Participant) -> Iterator[Deployment]:
    # Depends on the participant so that it is closed after the handlers stopped.
    made = Deployment(store_url)
    yield made
    made.close()


@pytest.fixture
def pg_participant(pg_url: str) -> Iterator[Participant]:
    empty_tables(pg_url)
    p = Participant(pg_url)
    yield p
    p.close()


@pytest.fixture
def on_redis(
    pg_url: str, redis_url: str, prefix: str, pg_participant: Participant
) -> Iterator[Deployment]:
    made = Deployment(pg_url, redis_url=redis_url, prefix=prefix)
    yield made
    made.close()


def effects_once(p: Participant) -> dict[str, int]:
    counts = p.effect_counts()
    assert set(counts.values()) <= {1}, counts
    return counts


def events(engine: SagaEngine, saga_id: str, kind: str) -> list[EventRecord]:
    return [e for e in timeline(engine, saga_id) if e.kind == kind]


def compensation_order(engine: SagaEngine, saga_id: str) -> list[str | None]:
    return [
        e.step_name for e in events(engine, saga_id, "attempt_succeeded") if e.phase == "compensate"
    ]


# -- definitions ------------------------------------------------------------------


def test_a_remote_step_names_its_commands_and_its_service() -> None:
    saga = Saga("trip")
    saga.remote_step("hotel", "hotel.reserve", compensation="hotel.cancel")
    saga.remote_step("charge", "payments.charge", pivot=True)
    hotel, charge = saga.steps
    assert hotel.remote is not None and charge.remote is not None
    assert hotel.remote.service == "hotel"
    assert hotel.remote.command(Phase.COMPENSATE) == "hotel.cancel"
    assert hotel.compensation is not None  # so the core knows it has something to undo
    assert charge.compensation is None and charge.remote.command(Phase.COMPENSATE) is None
    assert hotel.external and not hotel.transactional


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda s: s.remote_step("a", "no spaces allowed"), "command 'no spaces allowed'"),
        (lambda s: s.remote_step("a", "hotel.reserve", compensation="a b"), "command 'a b'"),
        (lambda s: s.wait_for("bad event", name="ok"), "an event name"),
        (lambda s: (s.wait_for("go"), s.wait_for("go", name="again")), "already waits for"),
    ],
)
def test_bad_remote_and_waiting_steps_are_refused_when_built(build: Any, problem: str) -> None:
    with pytest.raises(DefinitionError, match=problem):
        build(Saga("trip"))


def test_a_remote_step_is_neither_transactional_nor_undone_by_a_function() -> None:
    saga = Saga("trip")
    handle = saga.remote_step("hotel", "hotel.reserve")
    with pytest.raises(DefinitionError, match="undone by a command"):
        handle.compensate(lambda ctx, out: None)

    with pytest.raises(DefinitionError, match="cannot be transactional"):
        saga.add_step("b", lambda ctx: None, transactional=True, remote=Remote("b.go"))


def test_participant_handlers_are_checked_when_registered() -> None:
    handlers = ParticipantService("p")
    handlers.add_handler("hotel.reserve", lambda ctx: None)
    with pytest.raises(DefinitionError, match="already has a handler"):
        handlers.add_handler("hotel.reserve", lambda ctx: None)
    with pytest.raises(DefinitionError, match=r"'service\.name'"):
        handlers.add_handler("hotel reserve", lambda ctx: None)
    assert handlers.services == ["hotel"]


# -- in-process: the embedded default ---------------------------------------------


def test_remote_steps_run_in_process_without_redis(
    embedded: Deployment, participant: Participant
) -> None:
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, service(participant))
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {}, correlation_id="corr-remote-1").id

    done = wait_state(engine, saga_id, SagaState.COMPLETED)

    assert [s.output for s in done.steps] == [{"step": s, "phase": "action"} for s in STEPS]
    assert [(c.step, c.attempt) for c in participant.calls(saga_id)] == [(s, 1) for s in STEPS]
    started = events(engine, saga_id, "attempt_started")
    assert [e.detail["command"] for e in started if e.detail] == ["hotel.do", "flight.do", "car.do"]
    succeeded = events(engine, saga_id, "attempt_succeeded")
    assert {e.detail["participant"] for e in succeeded if e.detail} == {"w1:participant"}
    assert {e.correlation_id for e in timeline(engine, saga_id)} == {"corr-remote-1"}
    assert done.lease_owner is None
    effects_once(participant)


def test_a_participant_handler_gets_the_step_context(
    embedded: Deployment, participant: Participant
) -> None:
    seen: list[StepContext] = []

    def hotel(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"room": 12}

    handlers = ParticipantService("ctx")
    handlers.add_handler("hotel.do", hotel)
    handlers.add_handler("hotel.undo", lambda ctx, output: None)
    handlers.add_handler("flight.do", lambda ctx: seen.append(ctx) or {"seat": "4C"})
    handlers.add_handler("flight.undo", lambda ctx, output: None)
    handlers.add_handler("car.do", lambda ctx: None)
    handlers.add_handler("car.undo", lambda ctx, output: None)
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, handlers)
    embedded.worker(engine)
    started = engine.start("rtravel", {"who": "Ada"}, business_key="T-7", correlation_id="c-7")
    wait_state(engine, started.id, SagaState.COMPLETED)

    first, second = seen
    assert (first.saga_id, first.step, first.phase, first.attempt) == (
        started.id,
        "hotel",
        Phase.ACTION,
        1,
    )
    assert first.idempotency_key == f"{started.id}:hotel:action"
    assert (first.correlation_id, first.business_key, first.payload) == (
        "c-7",
        "T-7",
        {"who": "Ada"},
    )
    assert second.outputs == {"hotel": {"room": 12}}


def test_a_failing_participant_compensates_in_reverse_order(
    embedded: Deployment, participant: Participant
) -> None:
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, service(participant))
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {"fatal": {"car": True}}).id

    done = wait_state(engine, saga_id, SagaState.COMPENSATED)

    assert compensation_order(engine, saga_id) == ["car", "flight", "hotel"]
    assert participant.effects(saga_id) == [
        ("hotel", "action"),
        ("flight", "action"),
        ("car", "compensate"),
        ("flight", "compensate"),
        ("hotel", "compensate"),
    ]
    [failed] = [e for e in events(engine, saga_id, "attempt_failed") if e.step_name == "car"]
    assert failed.error is not None and "NonRetryableError: car refused for good" in failed.error
    assert failed.traceback is not None and "NonRetryableError" in failed.traceback
    assert done.steps[2].attempts == 1  # a non-retryable reply is not retried
    effects_once(participant)


def test_a_retriable_failure_is_retried_with_a_new_command(
    embedded: Deployment, participant: Participant
) -> None:
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, service(participant))
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {"fail": {"flight": 2}}).id

    done = wait_state(engine, saga_id, SagaState.COMPLETED)

    assert done.steps[1].attempts == 3
    flight = [c.attempt for c in participant.calls(saga_id) if c.step == "flight"]
    assert flight == [1, 2, 3]
    effects_once(participant)


def test_a_late_reply_after_the_timeout_is_noted_and_ignored(
    embedded: Deployment, participant: Participant
) -> None:
    def slow_first_flight(ctx: StepContext) -> Any:
        result = participant.action(ctx)  # the effect happens, under the guard
        if ctx.attempt == 1:
            time.sleep(1.0)  # ...but the reply comes after the 0.4 s deadline
        return result

    handlers = service(participant)
    handlers._handlers["flight.do"] = slow_first_flight
    engine = embedded.engine(remote_travel(timeouts={"flight": 0.4}))
    embedded.participant(engine, handlers)
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {}).id

    wait_state(engine, saga_id, SagaState.COMPLETED)
    discarded = wait_for(lambda: events(engine, saga_id, "result_discarded"))

    [timed_out] = events(engine, saga_id, "attempt_timed_out")
    assert (timed_out.step_name, timed_out.attempt) == ("flight", 1)
    assert timed_out.error is not None and "no reply to 'flight.do' within 0.4s" in timed_out.error
    [late] = discarded
    assert (late.step_name, late.phase, late.attempt) == ("flight", "action", 1)
    assert late.detail is not None and late.detail["reply"] == "success"
    assert "late or repeated reply" in late.detail["why"]
    inst = engine.get(saga_id)
    assert inst.steps[1].attempts == 2 and inst.state is SagaState.COMPLETED
    assert participant.effect_counts()[f"{saga_id}:flight:action"] == 1


def test_a_late_command_after_its_compensation_is_refused_by_the_guard(
    embedded: Deployment, participant: Participant
) -> None:
    # The flight service is slow to act: the step times out, the saga compensates the
    # flight (nothing to undo yet) and the hotel. Then the flight's handler reaches its
    # guard, which refuses the late action: no flight is booked behind the saga's back.
    compensated = threading.Event()

    def late_flight(ctx: StepContext) -> Any:
        compensated.wait(10)
        return participant.action(ctx)

    def undo_flight(ctx: StepContext, output: Any) -> Any:
        undone = participant.compensation(ctx, output)
        compensated.set()
        return undone

    handlers = service(participant)
    handlers._handlers["flight.do"] = late_flight
    handlers._handlers["flight.undo"] = undo_flight
    saga = remote_travel(timeouts={"flight": 0.4}, retry=Retry(max_attempts=1))
    engine = embedded.engine(saga)
    embedded.participant(engine, handlers)
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {}).id

    wait_state(engine, saga_id, SagaState.COMPENSATED)
    [late] = wait_for(lambda: events(engine, saga_id, "result_discarded"))
    assert (late.step_name, late.phase, late.detail and late.detail["reply"]) == (
        "flight",
        "action",
        "fail",
    )
    assert late.error is not None and "ActionFenced" in late.error
    assert f"{saga_id}:flight:action" not in participant.effect_counts()


def test_a_command_nobody_handles_fails_the_step_and_the_saga_compensates(
    embedded: Deployment, participant: Participant
) -> None:
    handlers = ParticipantService("partial")
    for step in ("hotel", "flight"):
        handlers.add_handler(f"{step}.do", participant.action)
        handlers.add_handler(f"{step}.undo", participant.compensation)
    handlers.add_handler("car.undo", participant.compensation)
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, handlers)
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {}).id

    done = wait_state(engine, saga_id, SagaState.COMPENSATED)

    assert done.steps[2].attempts == QUICK.max_attempts  # retriable: maybe another has it
    assert done.steps[2].error is not None and "no handler for 'car.do'" in done.steps[2].error
    assert compensation_order(engine, saga_id) == ["car", "flight", "hotel"]


def test_in_process_and_remote_steps_mix(embedded: Deployment, participant: Participant) -> None:
    saga = Saga("mixed_remote", default_retry=QUICK, default_compensation_retry=QUICK)
    saga.add_step("local", participant.action, participant.compensation)
    saga.remote_step("hotel", "hotel.do", compensation="hotel.undo")
    saga.add_step("after", participant.action, participant.compensation)
    engine = embedded.engine(saga)
    embedded.participant(engine, service(participant))
    embedded.worker(engine)
    saga_id = engine.start("mixed_remote", {}).id

    wait_state(engine, saga_id, SagaState.COMPLETED)

    assert [step for step, _ in participant.effects(saga_id)] == ["local", "hotel", "after"]
    effects_once(participant)


def test_a_batch_of_replies_is_recorded_in_one_go(
    embedded: Deployment, participant: Participant
) -> None:
    engine = embedded.engine(remote_travel())
    ids = [engine.start("rtravel", {}).id for _ in range(3)]  # each sends its hotel command
    bus = embedded.bus
    commands = [
        Command.from_fields(e.fields)
        for e in bus.read([bus.commands_stream("hotel")], PARTICIPANTS, "test", 10, 0)
    ]
    assert sorted(c.saga_id for c in commands) == sorted(ids)
    replies = [Reply.to(c, Outcome.SUCCESS, output={"n": n}) for n, c in enumerate(commands)]

    handled = ReplyHandler(engine.collaborators).handle_batch(
        [*replies, replies[0]]
    )  # one repeated

    assert handled == [Handled.RECORDED] * 3 + [Handled.DISCARDED]
    for n, command in enumerate(commands):
        inst = engine.get(command.saga_id)
        assert inst.steps[0].output == {"n": n}
        assert inst.steps[1].attempts == 1  # the flight began in the same transaction
    flights = bus.read([bus.commands_stream("flight")], PARTICIPANTS, "test", 10, 0)
    assert sorted(Command.from_fields(e.fields).saga_id for e in flights) == sorted(ids)
    [repeat] = events(engine, commands[0].saga_id, "result_discarded")
    assert repeat.detail is not None and "moved on to 'flight'" in repeat.detail["why"]


def test_only_commands_of_attempts_begun_before_the_streams_were_lost_go_again(
    embedded: Deployment,
) -> None:
    # Redis lost its streams at `lost`: the command of an attempt begun before may be
    # gone with them; one begun after went to the new stream and is not sent twice.
    engine = embedded.engine(remote_travel(timeout=60.0))
    earlier = engine.start("rtravel", {}).id
    lost = engine.get(earlier).steps[0].started_at + 1
    wait_for(lambda: now_ms() > lost)
    later = engine.start("rtravel", {}).id
    bus = embedded.bus
    stream = bus.commands_stream("hotel")
    bus.read([stream], PARTICIPANTS, "test", 10, 0)  # both first commands, taken

    assert resend_in_flight(engine.collaborators, begun_before=lost) == 1
    [again] = bus.read([stream], PARTICIPANTS, "test", 10, 0)
    assert Command.from_fields(again.fields).saga_id == earlier
    assert resend_in_flight(engine.collaborators) == 2  # without a moment: every one
    assert {
        Command.from_fields(e.fields).saga_id
        for e in bus.read([stream], PARTICIPANTS, "test", 10, 0)
    } == {earlier, later}


def test_a_stale_batch_is_refused_whole(embedded: Deployment) -> None:
    engine = embedded.engine(remote_travel())
    first, second = (engine.get(engine.start("rtravel", {}).id) for _ in range(2))
    defn = engine.registry.latest("rtravel")
    now = engine.clock()
    stale = replace(second, version=second.version - 1)
    changes = [
        (first, record_success(first, defn, now, {"ok": 1})),
        (stale, record_success(stale, defn, now, {"ok": 2})),
    ]

    with pytest.raises(ConcurrencyConflict), engine.store.transaction() as conn:
        engine.store.save_many(changes, "test", conn)

    assert engine.get(first.id) == first  # rolled back with the rest


def test_run_inline_hands_a_remote_step_to_the_participant(
    embedded: Deployment, participant: Participant
) -> None:
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, service(participant))
    embedded.worker(engine)

    inst = engine.run("rtravel", {})  # returns once the first command is out

    assert inst.state is SagaState.RUNNING and inst.lease_owner is None
    wait_state(engine, inst.id, SagaState.COMPLETED)
    effects_once(participant)


def test_cancelling_while_a_command_is_in_flight_discards_its_reply(
    embedded: Deployment, participant: Participant, tmp_path: Path
) -> None:
    gate = tmp_path / "hold-hotel"
    gate.touch()
    engine = embedded.engine(remote_travel())
    embedded.participant(engine, service(participant))
    embedded.worker(engine)
    saga_id = engine.start("rtravel", {"block_while": {"hotel": str(gate)}}).id
    wait_for(lambda: participant.effects(saga_id))  # the hotel acted and now holds its reply

    cancelled = engine.operations.cancel(saga_id, actor="ops", reason="customer called")
    gate.unlink()

    assert cancelled.state is SagaState.CANCELLED
    [late] = wait_for(lambda: events(engine, saga_id, "result_discarded"))
    assert late.detail is not None and "the saga is already cancelled" in late.detail["why"]
    assert engine.get(saga_id).state is SagaState.CANCELLED


def test_a_command_read_after_its_deadline_is_not_run(
    embedded: Deployment, participant: Participant
) -> None:
    engine = embedded.engine(remote_travel(timeouts={"hotel": 0.3}))
    saga_id = engine.start("rtravel", {}).id
    worker = embedded.worker(engine)
    wait_for(lambda: engine.get(saga_id).steps[0].attempts == 1)
    worker.stop()  # the first command waits on the bus; nobody reads it in time
    time.sleep(0.4)

    runtime = embedded.participant(engine, service(participant))
    embedded.worker(engine)

    wait_state(engine, saga_id, SagaState.COMPLETED)
    assert runtime.counts["expired"] == 1
    hotel = [c.attempt for c in participant.calls(saga_id) if c.step == "hotel"]
    assert hotel == [2]  # attempt 1 expired unrun; attempt 2 did the work


# -- on Redis Streams, with PostgreSQL ---------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
def test_remote_steps_over_redis_streams(
    on_redis: Deployment, pg_participant: Participant, client: redis.Redis, prefix: str
) -> None:
    first = on_redis.engine(remote_travel(), worker_id="w1")
    second = on_redis.engine(remote_travel(), worker_id="w2")
    on_redis.participant(first, service(pg_participant), only=["hotel", "flight"])
    on_redis.participant(second, service(pg_participant), only=["car"])
    on_redis.worker(first)
    on_redis.worker(second)

    ids = [
        first.start("rtravel", {"fatal": {"car": True}} if n % 3 == 0 else {}).id for n in range(12)
    ]
    for n, saga_id in enumerate(ids):
        wanted = SagaState.COMPENSATED if n % 3 == 0 else SagaState.COMPLETED
        wait_state(first, saga_id, wanted)
        if wanted is SagaState.COMPENSATED:
            assert compensation_order(first, saga_id) == ["car", "flight", "hotel"]

    effects_once(pg_participant)
    for service_name in STEPS:
        stream = f"{prefix}:commands:{service_name}"
        assert [g["name"] for g in client.xinfo_groups(stream)] == [PARTICIPANTS.encode()]
        wait_for(lambda s=stream: client.xpending(s, PARTICIPANTS)["pending"] == 0)
    replies = f"{prefix}:replies"
    assert [g["name"] for g in client.xinfo_groups(replies)] == [WORKERS.encode()]
    wait_for(lambda: client.xpending(replies, WORKERS)["pending"] == 0)
    [entry] = client.xrange(f"{prefix}:commands:hotel", count=1)
    fields = entry[1]
    assert fields[b"command"] == b"hotel.do" and fields[b"correlation_id"]
    assert Command.from_fields(fields).idempotency_key.endswith(":hotel:action")


@pytest.mark.redis
@pytest.mark.postgres
def test_malformed_commands_and_replies_become_poison_records(
    on_redis: Deployment, pg_participant: Participant, client: redis.Redis, prefix: str
) -> None:
    engine = on_redis.engine(remote_travel())
    runtime = on_redis.participant(engine, service(pg_participant))
    worker = on_redis.worker(engine)
    healthy = engine.start("rtravel", {}).id
    wait_state(engine, healthy, SagaState.COMPLETED)

    client.xadd(f"{prefix}:commands:hotel", {"hello": "world"})
    client.xadd(f"{prefix}:commands:hotel", {"v": "1", "command": "hotel.do", "saga_id": "x"})
    client.xadd(
        f"{prefix}:commands:hotel",
        {"v": "1", "command": "hotel.do", "saga_id": healthy, "correlation_id": "c", "body": "{"},
    )
    client.xadd(f"{prefix}:replies", {"v": "1", "outcome": "success", "saga_id": b"\x80\x81"})
    client.xadd(f"{prefix}:replies", {"v": "1", "saga_id": healthy, "outcome": "maybe"})

    poison = f"{prefix}:poison"
    wait_for(lambda: client.xlen(poison) == 5)
    records = {r[1][b"source_stream"].decode(): [] for r in client.xrange(poison)}
    for _, fields in client.xrange(poison):
        records[fields[b"source_stream"].decode()].append(fields[b"reason"].decode())
    assert sorted(records) == [f"{prefix}:commands:hotel", f"{prefix}:replies"]
    assert any(
        "no command field" in r or "wire version" in r for r in records[f"{prefix}:commands:hotel"]
    )
    assert any("not a saga id" in r for r in records[f"{prefix}:commands:hotel"])
    assert any("body is not JSON" in r for r in records[f"{prefix}:commands:hotel"])
    assert any("not UTF-8" in r for r in records[f"{prefix}:replies"])
    assert any("outcome 'maybe'" in r for r in records[f"{prefix}:replies"])
    raw = [f for _, f in client.xrange(poison) if f.get(b"raw:hello") == b"world"]
    assert raw, "the raw fields are kept byte for byte"

    wait_for(lambda: client.xpending(f"{prefix}:commands:hotel", PARTICIPANTS)["pending"] == 0)
    wait_for(lambda: client.xpending(f"{prefix}:replies", WORKERS)["pending"] == 0)
    after = engine.start("rtravel", {}).id  # both readers carry on
    wait_state(engine, after, SagaState.COMPLETED)
    assert not worker.stopping and runtime.counts["success"] >= 6
    effects_once(pg_participant)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"output": {"note": "a\x00b"}}, "NUL character"),
        ({"attempt": 2**40}, "body.attempt 1099511627776 is out of range"),
        ({"step_index": -1}, "body.step_index -1 is out of range"),
    ],
)
def test_a_reply_the_store_could_not_keep_is_set_aside(
    embedded: Deployment, body: dict[str, Any], problem: str
) -> None:
    engine = embedded.engine(remote_travel())
    bus = embedded.bus
    saga_id = engine.start("rtravel", {}).id
    [entry] = bus.read([bus.commands_stream("hotel")], PARTICIPANTS, "test", 1, 0)
    fields = Reply.to(Command.from_fields(entry.fields), Outcome.SUCCESS).to_fields()
    fields["body"] = json.dumps({**json.loads(fields["body"]), **body})
    raw = {k.encode(): v.encode() for k, v in fields.items()}

    with pytest.raises(BadMessage, match=problem):
        Reply.from_fields(raw)

    listener = ReplyListener(engine.collaborators).start()
    bus.send(bus.replies_stream, fields)
    wait_for(lambda: len(bus.poisoned) == 1)  # type: ignore[attr-defined]
    listener.stop()
    assert problem in bus.poisoned[0][1]  # type: ignore[attr-defined]
    assert engine.get(saga_id).steps[0].attempts == 1  # nothing was recorded


def test_a_reply_the_store_refuses_does_not_hold_up_the_batch(embedded: Deployment) -> None:
    engine = embedded.engine(remote_travel())
    bus = embedded.bus
    ids = [engine.start("rtravel", {}).id for _ in range(3)]
    commands = [
        Command.from_fields(e.fields)
        for e in bus.read([bus.commands_stream("hotel")], PARTICIPANTS, "test", 10, 0)
    ]
    pill = commands[1].saga_id

    def refuse(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        # The store refuses whatever carries the pill, as PostgreSQL refuses a value
        # out of range: a DataError, not an outage.
        if "poison-pill" in repr(params):
            raise sa.exc.DataError(statement, params, ValueError("value out of range"))

    sa.event.listen(engine.store.db, "before_cursor_execute", refuse)
    try:
        for command in commands:
            output = {"ref": "poison-pill" if command.saga_id == pill else "fine"}
            bus.send(
                bus.replies_stream, Reply.to(command, Outcome.SUCCESS, output=output).to_fields()
            )
        listener = ReplyListener(engine.collaborators).start()
        wait_for(lambda: len(bus.poisoned) == 1)  # type: ignore[attr-defined]
        for saga_id in ids:
            if saga_id != pill:
                wait_for(lambda s=saga_id: engine.get(s).steps[0].output == {"ref": "fine"})
        listener.stop()
    finally:
        sa.event.remove(engine.store.db, "before_cursor_execute", refuse)

    [(entry, reason)] = bus.poisoned  # type: ignore[attr-defined]
    assert Reply.from_fields(entry.fields).saga_id == pill
    assert reason.startswith("the store refused it: value out of range")
    assert engine.get(pill).steps[0].output is None


@pytest.mark.redis
@pytest.mark.postgres
def test_commands_lost_with_redis_are_sent_again(
    on_redis: Deployment, pg_participant: Participant, client: redis.Redis, prefix: str
) -> None:
    # The reply deadline is a minute: only sending the command again can finish it sooner.
    engine = on_redis.engine(remote_travel(timeout=60.0))
    on_redis.worker(engine)
    wait_for(lambda: _has_group(client, f"{prefix}:replies", WORKERS))
    saga_id = engine.start("rtravel", {}).id
    wait_for(lambda: client.xlen(f"{prefix}:commands:hotel") == 1)

    client.flushdb()  # the command goes, with the groups
    on_redis.participant(engine, service(pg_participant))

    wait_state(engine, saga_id, SagaState.COMPLETED, timeout=20)
    assert engine.get(saga_id).steps[0].attempts == 1  # the same attempt, sent again
    effects_once(pg_participant)


@pytest.mark.redis
@pytest.mark.postgres
def test_a_dead_participants_pending_command_is_taken_over(
    on_redis: Deployment, pg_participant: Participant, client: redis.Redis, prefix: str
) -> None:
    engine = on_redis.engine(remote_travel(timeout=60.0), redis_claim_idle_seconds=0.5)
    on_redis.worker(engine)
    stream = f"{prefix}:commands:hotel"
    client.xgroup_create(stream, PARTICIPANTS, id="0", mkstream=True)
    saga_id = engine.start("rtravel", {}).id
    wait_for(lambda: client.xlen(stream) == 1)
    # A participant reads the command, then dies before replying.
    assert client.xreadgroup(PARTICIPANTS, "dead", {stream: ">"}, count=10)

    on_redis.participant(engine, service(pg_participant))

    wait_state(engine, saga_id, SagaState.COMPLETED, timeout=20)
    assert engine.get(saga_id).steps[0].attempts == 1
    wait_for(lambda: client.xpending(stream, PARTICIPANTS)["pending"] == 0)
    effects_once(pg_participant)


@pytest.mark.redis
@pytest.mark.postgres
def test_a_dead_workers_pending_reply_is_taken_over(
    on_redis: Deployment, pg_participant: Participant, client: redis.Redis, prefix: str
) -> None:
    engine = on_redis.engine(remote_travel(timeout=60.0), redis_claim_idle_seconds=0.5)
    replies = f"{prefix}:replies"
    client.xgroup_create(replies, WORKERS, id="0", mkstream=True)
    on_redis.participant(engine, service(pg_participant))
    inst = engine.run("rtravel", {})  # no worker yet: the hotel's reply waits
    wait_for(lambda: client.xlen(replies) == 1)
    # A worker reads the reply, then dies before recording it.
    assert client.xreadgroup(WORKERS, "dead", {replies: ">"}, count=10)

    on_redis.worker(engine)

    wait_state(engine, inst.id, SagaState.COMPLETED, timeout=20)
    assert engine.get(inst.id).steps[0].attempts == 1
    wait_for(lambda: client.xpending(replies, WORKERS)["pending"] == 0)
    effects_once(pg_participant)


def _has_group(client: redis.Redis, stream: str, group: str) -> bool:
    try:
        return any(g["name"] == group.encode() for g in client.xinfo_groups(stream))
    except redis.ResponseError:
        return False


@pytest.mark.redis
def test_the_redis_bus_keeps_its_keys_under_the_prefix(redis_url: str, prefix: str) -> None:
    bus = RedisStreams(redis_url, prefix=prefix)
    try:
        assert bus.commands_stream("hotel") == f"{prefix}:commands:hotel"
        assert bus.replies_stream == f"{prefix}:replies"
        assert bus.poison_stream == f"{prefix}:poison"
    finally:
        bus.close()


# -- the command line ------------------------------------------------------------------


def test_saga_participant_needs_redis(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_DATABASE_URL", sqlite_url)
    monkeypatch.delenv("SAGA_REDIS_URL", raising=False)
    result = CliRunner().invoke(main, ["-A", "examples.remote_participants", "participant"])
    assert result.exit_code == 2
    assert "SAGA_REDIS_URL" in result.output and "engine.participant" in result.output


def test_saga_participant_refuses_a_service_it_has_no_handlers_for(
    sqlite_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("SAGA_REDIS_URL", redis_url)
    result = CliRunner().invoke(
        main, ["-A", "examples.remote_participants", "participant", "--service", "boats"]
    )
    assert result.exit_code == 2
    assert "no handlers for boats" in result.output and "car, flight, hotel" in result.output


def test_the_remote_example_runs_without_redis(sqlite_url: str) -> None:
    engine = SagaEngine(
        [travel_booking_remote.book_trip_remote],
        settings=Settings(database_url=sqlite_url, poll_seconds=0.05),
    )
    try:
        travel_booking_remote.init_engine(engine)  # what `saga worker` calls
        worker = engine.worker(4).start()
        ok = engine.start("book_trip_remote", {"traveller": "Ada"}).id
        undone = engine.start("book_trip_remote", {"fail": {"car": "permanent"}}).id
        wait_state(engine, ok, SagaState.COMPLETED)
        wait_state(engine, undone, SagaState.COMPENSATED)
        worker.stop()
        assert [r["status"] for r in remote_participants.cars.records(ok)] == ["active"]
        assert [r["status"] for r in remote_participants.hotels.records(undone)] == ["cancelled"]
        assert remote_participants.cars.records(undone) == []
        assert compensation_order(engine, undone) == ["rent_car", "book_flight", "reserve_hotel"]
    finally:
        engine.close()


# -- the bus contract: in-process queues and Redis streams -------------------------


class BusContract:
    """What remote steps rely on from any command bus."""

    @pytest.fixture
    def bus(self) -> Iterator[CommandBus]:
        raise NotImplementedError

    def test_what_is_sent_is_read_with_its_fields(self, bus: CommandBus) -> None:
        stream = bus.commands_stream("hotel")
        bus.send(stream, {"a": "1", "text": "héllo"})
        [entry] = bus.read([stream], PARTICIPANTS, "c1", 10, 1.0)
        assert entry.stream == stream and dict(entry.fields) == {
            b"a": b"1",
            b"text": "héllo".encode(),
        }

    def test_reads_cover_several_streams_and_at_most_count(self, bus: CommandBus) -> None:
        hotel, car = bus.commands_stream("hotel"), bus.commands_stream("car")
        bus.send_many([(hotel, {"n": str(n)}) for n in range(3)] + [(car, {"n": "9"})])
        first = bus.read([hotel, car], PARTICIPANTS, "c1", 2, 1.0)
        rest = bus.read([hotel, car], PARTICIPANTS, "c1", 10, 1.0)
        assert len(first) == 2
        assert sorted(e.fields[b"n"] for e in first + rest) == [b"0", b"1", b"2", b"9"]

    def test_an_empty_read_waits_then_returns_nothing(self, bus: CommandBus) -> None:
        assert bus.read([bus.replies_stream], WORKERS, "c1", 10, 0.05) == []

    def test_readers_of_one_group_share_the_entries(self, bus: CommandBus) -> None:
        stream = bus.replies_stream
        bus.send_many([(stream, {"n": str(n)}) for n in range(4)])
        one = bus.read([stream], WORKERS, "c1", 2, 1.0)
        two = bus.read([stream], WORKERS, "c2", 10, 1.0)
        assert sorted(e.id for e in one + two) == sorted({e.id for e in one + two})
        assert len(one + two) == 4

    def test_send_and_ack_replies_and_acknowledges(self, bus: CommandBus) -> None:
        stream = bus.commands_stream("hotel")
        bus.send(stream, {"cmd": "x"})
        [command] = bus.read([stream], PARTICIPANTS, "c1", 1, 1.0)
        bus.send_and_ack([(bus.replies_stream, {"re": "x"})], PARTICIPANTS, [command])
        [reply] = bus.read([bus.replies_stream], WORKERS, "w1", 1, 1.0)
        assert reply.fields == {b"re": b"x"}

    def test_a_poisoned_entry_is_not_delivered_again(self, bus: CommandBus) -> None:
        stream = bus.replies_stream
        bus.send(stream, {"junk": "yes"})
        [entry] = bus.read([stream], WORKERS, "w1", 1, 1.0)
        bus.poison(WORKERS, entry, "junk")
        assert bus.read([stream], WORKERS, "w2", 10, 0.05) == []


class TestInProcessBus(BusContract):
    @pytest.fixture
    def bus(self) -> Iterator[CommandBus]:
        made = InProcessBus()
        yield made
        assert [reason for _, reason in made.poisoned] in ([], ["junk"])


@pytest.mark.redis
class TestRedisBus(BusContract):
    @pytest.fixture
    def bus(self, redis_url: str, prefix: str, client: redis.Redis) -> Iterator[CommandBus]:
        made = RedisStreams(redis_url, prefix=prefix, claim_idle_seconds=0.2)
        yield made
        made.close()

    def test_an_unacknowledged_entry_is_taken_over_by_another_reader(self, bus: CommandBus) -> None:
        stream = bus.commands_stream("hotel")
        bus.send(stream, {"n": "1"})
        [taken] = bus.read([stream], PARTICIPANTS, "dies", 1, 1.0)
        time.sleep(0.3)  # past the idle threshold
        [again] = bus.read([stream], PARTICIPANTS, "lives", 1, 1.0)
        assert again.id == taken.id
        bus.ack(PARTICIPANTS, [again])
        time.sleep(0.3)
        assert bus.read([stream], PARTICIPANTS, "third", 1, 0.05) == []

    def test_a_lost_group_is_made_again_and_counted(
        self, bus: CommandBus, client: redis.Redis
    ) -> None:
        stream = bus.replies_stream
        bus.read([stream], WORKERS, "w1", 1, 0.05)
        made = bus.groups_created.get(stream, 0)
        client.flushdb()
        bus.send(stream, {"after": "flush"})
        [entry] = bus.read([stream], WORKERS, "w1", 1, 1.0)
        assert entry.fields == {b"after": b"flush"}
        assert bus.groups_created == {stream: made + 1}


# -- the Redis bus: the cap on redelivery, dead consumers ---------------------------------

MakeBus = Callable[..., RedisStreams]


@pytest.fixture
def make_bus(redis_url: str, prefix: str, client: redis.Redis) -> Iterator[MakeBus]:
    """Redis buses on this test's prefix, one per reader as in separate processes."""
    made: list[RedisStreams] = []

    def make(**options: Any) -> RedisStreams:
        bus = RedisStreams(redis_url, prefix=prefix, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.close()


@pytest.mark.redis
def test_the_redis_bus_sets_aside_an_entry_taken_over_too_often(
    make_bus: MakeBus, client: redis.Redis
) -> None:
    # Every participant that takes the pill dies (here: never acknowledges it).
    a, b, c, d = (make_bus(claim_idle_seconds=0.05, max_deliveries=2) for _ in range(4))
    stream = a.commands_stream("hotel")
    counted = {"stream": stream, "why": "redelivered"}
    before = metrics.total(metrics.values(metrics.exposition().decode()), POISONED, **counted)
    a.send_many([(stream, {"n": "pill"}), (stream, {"n": "other"})])
    pill, other = a.read([stream], PARTICIPANTS, "a", 10, 1.0)  # delivery 1 of each
    time.sleep(0.1)
    assert [e.id for e in b.read([stream], PARTICIPANTS, "b", 1, 0.2)] == [pill.id]  # 2nd
    time.sleep(0.1)

    # The pill's third delivery is one too many; the other's second is within the cap.
    [other_again] = c.read([stream], PARTICIPANTS, "c", 10, 0.2)
    assert other_again.id == other.id

    [record] = c.poison_records()
    assert record.reason == (
        "delivered 3 times and never acknowledged "
        "(every reader that took it died or hung); set aside"
    )
    assert (record.source_stream, record.source_id) == (stream, pill.id)
    assert record.fields == {b"n": b"pill"}
    pending = client.xpending_range(stream, PARTICIPANTS, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [other.id]  # the pill is acknowledged
    c.ack(PARTICIPANTS, [other_again])
    time.sleep(0.1)
    assert d.read([stream], PARTICIPANTS, "d", 10, 0.2) == []
    assert len(d.poison_records()) == 1
    after = metrics.total(metrics.values(metrics.exposition().decode()), POISONED, **counted)
    assert after - before == 1


POISONED = "saga_poison_records_total"


@pytest.mark.redis
def test_the_redis_bus_removes_consumers_of_dead_readers(
    make_bus: MakeBus, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.transport.redis_streams")
    # Scans every 1 s; the held entry becomes claimable only after 2 s.
    me = make_bus(claim_idle_seconds=2.0, forget_idle_seconds=0.2)
    dead, holding = make_bus(), make_bus()
    stream = me.replies_stream
    me.send_many([(stream, {"n": str(n)}) for n in range(3)])
    me.ack(WORKERS, me.read([stream], WORKERS, "me", 1, 1.0))  # its first scan: nobody idle
    dead.ack(WORKERS, dead.read([stream], WORKERS, "dead", 1, 1.0))  # died holding nothing
    assert holding.read([stream], WORKERS, "holding", 1, 1.0)  # died holding a reply
    time.sleep(1.1)

    assert me.read([stream], WORKERS, "me", 10, 0.05) == []  # this scan goes round

    consumers = {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(stream, WORKERS)}
    assert consumers == {"me": 0, "holding": 1}
    assert f"removed consumer dead from group {WORKERS} on {stream}" in caplog.text


@pytest.mark.redis
def test_refused_upkeep_calls_do_not_stop_the_redis_bus_reading(
    make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dies = make_bus()
    lives = make_bus(claim_idle_seconds=0.05, max_deliveries=1, forget_idle_seconds=0.01)
    stream = dies.commands_stream("hotel")
    dies.send(stream, {"n": "1"})
    [taken] = dies.read([stream], PARTICIPANTS, "dies", 1, 1.0)
    time.sleep(0.1)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise redis.ResponseError("NOPERM this user has no permissions to run the command")

    # An ACL written before these calls existed refuses them.
    monkeypatch.setattr(lives.client, "xpending_range", refuse)
    monkeypatch.setattr(lives.client, "xinfo_consumers", refuse)

    [again] = lives.read([stream], PARTICIPANTS, "lives", 10, 0.2)

    assert again.id == taken.id  # delivered unchecked rather than not at all
    assert "could not count how often 1 entries" in caplog.text
    assert "could not remove dead consumers" in caplog.text


@pytest.mark.redis
def test_an_entry_kept_by_its_reader_is_not_taken_over_nor_counted(
    make_bus: MakeBus, client: redis.Redis
) -> None:
    holder, other = (make_bus(claim_idle_seconds=0.3) for _ in range(2))
    stream = holder.commands_stream("hotel")
    holder.send(stream, {"n": "long"})
    [entry] = holder.read([stream], PARTICIPANTS, "holder", 1, 1.0)

    for _ in range(6):  # 1.2 s in all: four idle periods, kept every 0.2 s
        time.sleep(0.2)
        holder.keep(PARTICIPANTS, "holder", [entry])
        assert other.read([stream], PARTICIPANTS, "other", 1, 0.0) == []

    [pending] = client.xpending_range(stream, PARTICIPANTS, "-", "+", 1)
    assert (pending["consumer"], pending["times_delivered"]) == (b"holder", 1)
    time.sleep(0.4)  # no longer kept: the holder is gone
    [taken] = other.read([stream], PARTICIPANTS, "other", 1, 0.0)
    assert taken.id == entry.id


@pytest.mark.redis
@pytest.mark.postgres
def test_a_handler_longer_than_the_idle_period_runs_once(
    on_redis: Deployment, pg_participant: Participant
) -> None:
    # Another participant of the service scans for abandoned commands every 0.25 s;
    # the hotel's handler takes 2 s, four times the idle period.
    engine = on_redis.engine(remote_travel(timeout=20.0), redis_claim_idle_seconds=0.5)
    on_redis.participant(engine, service(pg_participant))
    other = on_redis.engine(
        remote_travel(timeout=20.0), worker_id="w2", redis_claim_idle_seconds=0.5
    )
    on_redis.participant(other, service(pg_participant))
    on_redis.worker(engine)
    # A worker that makes the reply group sends the commands in flight again (Redis
    # may have lost them): warm up first, so that the only repeat could be a takeover.
    wait_state(engine, engine.start("rtravel", {}).id, SagaState.COMPLETED)

    saga_id = engine.start("rtravel", {"sleep": {"hotel": 2}}).id

    done = wait_state(engine, saga_id, SagaState.COMPLETED, timeout=30)
    assert [c.step for c in pg_participant.calls(saga_id)] == ["hotel", "flight", "car"]
    assert done.steps[0].attempts == 1
    assert events(engine, saga_id, "result_discarded") == []


@pytest.mark.redis
def test_odd_poison_records_are_read_leniently(make_bus: MakeBus, client: redis.Redis) -> None:
    # Whoever can write to Redis can write to the poison stream: such a record must
    # not hide the others (the console lists them).
    bus = make_bus()
    client.xadd(bus.poison_stream, {"reason": "fine", "at": "1700000000000", "raw:a": "b"})
    client.xadd(bus.poison_stream, {"reason": b"\xff<b>", "at": "soon", "source_stream": b"\xfe"})

    odd, fine = bus.poison_records()

    assert (odd.reason, odd.at, odd.source_stream) == ("\ufffd<b>", 0, "\ufffd")
    assert (fine.reason, fine.at, fine.fields) == ("fine", 1_700_000_000_000, {b"a": b"b"})
