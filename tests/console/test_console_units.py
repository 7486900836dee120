"""The console's pure helpers: attempts from events, filters, formatting, the login throttle."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from console.formatting import duration, pretty_json, timestamp
from console.params import parse_audit, parse_list
from console.ratelimit import LoginThrottle
from console.timeline import build_steps
from engine import InvalidInput, SagaState, StepStatus
from engine.model import Instance, StepState
from engine.queries import EventRecord
from engine.store import schema as t
from engine.users import UserStore


def _event(
    kind: str,
    at: int,
    step: int | None = 0,
    phase: str | None = "action",
    attempt: int | None = 1,
    error: str | None = None,
) -> EventRecord:
    return EventRecord(
        id=at,
        saga_id="s",
        correlation_id="c",
        at=at,
        kind=kind,
        step_index=step,
        step_name=None,
        phase=phase,
        attempt=attempt,
        actor="w",
        error=error,
        traceback="tb" if error else None,
        detail=None,
    )


def _instance(state: SagaState = SagaState.RUNNING) -> Instance:
    # Step a succeeded on its second attempt; step b's first attempt is in flight.
    return Instance(
        id="s",
        saga_name="x",
        saga_version=1,
        state=state,
        cursor=1,
        steps=(
            StepState(0, "a", status=StepStatus.SUCCEEDED, attempts=2),
            StepState(1, "b", status=StepStatus.RUNNING, attempts=1),
        ),
        payload=None,
        correlation_id="c",
    )


class TestAttempts:
    def test_pairs_each_start_with_its_ending(self) -> None:
        events = [
            _event("saga_started", 1, step=None, phase=None, attempt=None),
            _event("attempt_started", 10),
            _event("attempt_failed", 25, error="boom"),
            _event("attempt_started", 40, attempt=2),
            _event("attempt_succeeded", 47, attempt=2),
            _event("attempt_started", 50, step=1),
        ]
        steps = build_steps(_instance(), events, {"s:a:action": 3}, None)
        first, second = steps[0].attempts
        assert (first.number, first.outcome, first.duration_ms, first.error) == (
            1,
            "failed",
            15,
            "boom",
        )
        assert first.traceback == "tb"
        assert (second.outcome, second.duration_ms) == ("succeeded", 7)
        [running] = steps[1].attempts
        assert running.outcome == "running" and running.duration_ms is None
        assert steps[0].action_duplicates == 3 and steps[0].compensate_duplicates == 0
        assert (steps[0].action_key, steps[1].compensate_key) == ("s:a:action", "s:b:compensate")

    def test_an_attempt_cut_short_by_an_operator_is_not_shown_running(self) -> None:
        stopped = _instance(SagaState.CANCELLED)
        step_b = StepState(1, "b", status=StepStatus.TIMED_OUT, attempts=1)
        stopped = stopped.with_step(step_b)
        events = [_event("attempt_started", 50, step=1)]
        [cut] = build_steps(stopped, events, {}, None)[1].attempts
        assert cut.outcome == "interrupted"

    def test_separates_action_and_compensation_attempts(self) -> None:
        events = [
            _event("attempt_started", 1),
            _event("attempt_timed_out", 9),
            _event("attempt_started", 10, phase="compensate"),
            _event("attempt_abandoned", 12, phase="compensate"),
        ]
        [step, _] = build_steps(_instance(), events, {}, None)
        assert [a.outcome for a in step.action_attempts] == ["timed_out"]
        assert [a.outcome for a in step.compensate_attempts] == ["abandoned"]


class TestParams:
    def test_list_filters(self) -> None:
        query = parse_list(
            {
                "state": "failed",
                "saga": " order ",
                "from": "2026-01-02T03:04",
                "to": "2026-01-03",
                "cursor": "1_x",
                "junk": "ignored",
            }
        )
        assert query.filter.state is SagaState.FAILED and query.filter.saga_name == "order"
        assert query.filter.created_from == 1767323040000
        assert query.filter.created_to == 1767398400000
        assert query.cursor == "1_x"
        assert query.args == {
            "state": "failed",
            "saga": "order",
            "from": "2026-01-02T03:04",
            "to": "2026-01-03",
        }

    def test_all_and_empty_mean_no_state(self) -> None:
        assert parse_list({"state": "all"}).filter.state is None
        assert parse_list({}).filter.state is None

    @pytest.mark.parametrize(
        "args", [{"state": "x"}, {"from": "now"}, {"from": "2026-01-02", "to": "2026-01-01"}]
    )
    def test_bad_list_filters(self, args: dict[str, str]) -> None:
        with pytest.raises(InvalidInput):
            parse_list(args)

    def test_audit_filters(self) -> None:
        query = parse_audit({"actor": "ann", "action": "skip", "before": "17"})
        assert (query.actor, query.action, query.before_id) == ("ann", "skip", 17)


class TestFormatting:
    @pytest.mark.parametrize(
        ("ms", "shown"),
        [
            (None, "—"),
            (850, "850 ms"),
            (4_200, "4.2 s"),
            (185_000, "3m 05s"),
            (7_380_000, "2h 03m"),
            (352_800_000, "4d 02h"),
        ],
    )
    def test_durations(self, ms: int | None, shown: str) -> None:
        assert duration(ms) == shown

    def test_timestamps_are_utc_with_milliseconds(self) -> None:
        assert timestamp(1767323040123) == "2026-01-02 03:04:00.123"

    def test_json_is_indented_and_sorted(self) -> None:
        assert pretty_json({"b": 1, "a": [1]}) == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}'


class TestLoginThrottle:
    """On the store, so that every console process counts the same failures."""

    @pytest.fixture
    def users(self, store_url: str) -> Iterator[UserStore]:
        from engine.store import open_store

        store = open_store(store_url)
        yield UserStore(store.db)
        store.dispose()

    def test_blocks_after_the_limit_until_the_window_passes(self, users: UserStore) -> None:
        now = [1_000.0]
        throttle = LoginThrottle(users, 3, 60, clock=lambda: now[0])
        for _ in range(3):
            assert throttle.retry_after("k") == 0
            throttle.failed("k")
        assert throttle.retry_after("k") == 60
        assert throttle.retry_after("other") == 0
        now[0] = 1_059.0
        assert throttle.retry_after("k") == 1
        now[0] = 1_060.5
        assert throttle.retry_after("k") == 0

    def test_success_clears_the_count(self, users: UserStore) -> None:
        throttle = LoginThrottle(users, 2, 60)
        throttle.failed("k")
        throttle.succeeded("k")
        throttle.failed("k")
        assert throttle.retry_after("k") == 0

    def test_two_console_processes_share_one_limit(self, users: UserStore) -> None:
        now = [1_000.0]
        first = LoginThrottle(users, 4, 60, clock=lambda: now[0])
        second = LoginThrottle(UserStore(users.db), 4, 60, clock=lambda: now[0])
        for throttle in (first, second, first, second):
            throttle.failed("ann|10.0.0.1")
        assert first.retry_after("ann|10.0.0.1") == 60
        assert second.retry_after("ann|10.0.0.1") == 60

    def test_failures_past_the_window_are_forgotten(self, users: UserStore) -> None:
        now = [1_000.0]
        throttle = LoginThrottle(users, 3, 60, clock=lambda: now[0])
        for n in range(50):
            throttle.failed(f"made-up-{n}|10.0.0.9")
        now[0] = 1_061.0
        throttle.failed("ann|10.0.0.1")
        with users.db.connect() as c:
            keys = list(c.execute(sa.select(t.login_failures.c.key)).scalars())
        assert keys == ["ann|10.0.0.1"]
