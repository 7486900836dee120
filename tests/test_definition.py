"""Saga definitions: every way to build a bad one fails at once, naming saga and step."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from engine import NO_RETRY, DefinitionError, NonRetryableError, Retry, Saga, StepContext
from engine.registry import Registry
from engine.states import StepKind


def act(ctx: StepContext) -> None:
    return None


def undo(ctx: StepContext, output: Any) -> None:
    return None


def assert_names(
    err: pytest.ExceptionInfo[DefinitionError], saga: str, step: str | None, words: str
) -> None:
    """The message names the saga, the step (when there is one) and the problem."""
    text = str(err.value)
    assert f"saga {saga!r}" in text
    assert err.value.saga == saga
    if step is not None:
        assert f"step {step!r}" in text
        assert err.value.step == step
    assert words in text


# -- building -----------------------------------------------------------------


def test_decorators_build_the_steps_in_order_with_their_kinds() -> None:
    trip = Saga("trip", version=2)

    @trip.step(timeout=timedelta(seconds=5), retry=Retry(max_attempts=4))
    def hotel(ctx: StepContext) -> dict[str, str]:
        return {"id": "h1"}

    @hotel.compensate
    def cancel_hotel(ctx: StepContext, output: Any) -> None:
        return None

    @trip.step(pivot=True)
    def charge(ctx: StepContext) -> None:
        return None

    @trip.step
    def email(ctx: StepContext) -> None:
        return None

    trip.validate()
    assert [s.name for s in trip.steps] == ["hotel", "charge", "email"]
    assert [s.kind for s in trip.steps] == [
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
        StepKind.RETRIABLE,
    ]
    assert trip.steps[0].compensation is cancel_hotel
    assert trip.steps[0].timeout == timedelta(seconds=5)
    assert trip.steps[0].retry.max_attempts == 4
    assert trip.steps[1].timeout == trip.default_timeout
    assert trip.pivot_index == 1
    assert hotel(_ctx()) == {"id": "h1"}  # the handle still calls the action


def test_a_compensatable_step_may_do_without_a_compensation_when_its_kind_is_implied() -> None:
    saga = Saga("read_only")
    saga.add_step("look", act)
    assert saga.validate().steps[0].kind is StepKind.COMPENSATABLE


def test_registration_validates_the_whole_saga() -> None:
    saga = Saga("declared")
    saga.add_step("a", act, kind=StepKind.COMPENSATABLE)
    with pytest.raises(DefinitionError) as err:
        Registry([saga])
    assert_names(err, "declared", "a", "declared compensatable but has no compensation")


def test_the_same_version_registered_twice_is_refused() -> None:
    one, two = Saga("twice"), Saga("twice")
    one.add_step("a", act)
    two.add_step("a", act)
    with pytest.raises(DefinitionError) as err:
        Registry([one, two])
    assert_names(err, "twice", None, "version 1 is registered twice")


# -- every DefinitionError ----------------------------------------------------


def test_duplicate_step_name() -> None:
    saga = Saga("dup")
    saga.add_step("a", act)
    with pytest.raises(DefinitionError) as err:
        saga.add_step("a", act)
    assert_names(err, "dup", "a", "duplicate step name")


def test_compensatable_step_after_the_pivot() -> None:
    saga = Saga("order")
    saga.add_step("charge", act, kind=StepKind.PIVOT)
    with pytest.raises(DefinitionError) as err:
        saga.add_step("refundable", act, undo, kind=StepKind.COMPENSATABLE)
    assert_names(err, "order", "refundable", "a compensatable step cannot follow the pivot")


def test_two_pivots() -> None:
    saga = Saga("order")
    saga.step(pivot=True)(act)
    with pytest.raises(DefinitionError) as err:
        saga.add_step("second", act, kind=StepKind.PIVOT)
    assert_names(err, "order", "second", "at most one pivot")


def test_retriable_step_before_the_pivot() -> None:
    saga = Saga("order")
    with pytest.raises(DefinitionError) as err:
        saga.add_step("ship", act, kind=StepKind.RETRIABLE)
    assert_names(err, "order", "ship", "a retriable step must follow a pivot step")


@pytest.mark.parametrize("kind", [StepKind.PIVOT, StepKind.RETRIABLE])
def test_compensation_given_to_add_step_of_a_forward_only_step(kind: StepKind) -> None:
    saga = Saga("order")
    if kind is StepKind.RETRIABLE:
        saga.add_step("charge", act, kind=StepKind.PIVOT)
    with pytest.raises(DefinitionError) as err:
        saga.add_step("s", act, undo, kind=kind)
    assert_names(err, "order", "s", f"a {kind} step cannot have a compensation")


@pytest.mark.parametrize("kind", [StepKind.PIVOT, StepKind.RETRIABLE])
def test_compensation_decorator_on_a_forward_only_step(kind: StepKind) -> None:
    saga = Saga("order")
    pivot = saga.add_step("charge", act, kind=StepKind.PIVOT)
    ship = saga.add_step("ship", act)
    handle, name = (pivot, "charge") if kind is StepKind.PIVOT else (ship, "ship")
    with pytest.raises(DefinitionError) as err:
        handle.compensate(undo)
    assert_names(err, "order", name, f"a {kind} step cannot have a compensation")


def test_explicit_compensatable_without_compensation_fails_validate() -> None:
    saga = Saga("explicit")
    saga.add_step("a", act, kind=StepKind.COMPENSATABLE)
    with pytest.raises(DefinitionError) as err:
        saga.validate()
    assert_names(err, "explicit", "a", "declared compensatable but has no compensation")


def test_explicit_compensatable_with_a_later_compensation_is_fine() -> None:
    saga = Saga("explicit")
    handle = saga.add_step("a", act, kind=StepKind.COMPENSATABLE)
    handle.compensate(undo)
    assert saga.validate().steps[0].compensation is undo


@pytest.mark.parametrize("timeout", [timedelta(0), timedelta(seconds=-1)])
def test_timeout_must_be_positive(timeout: timedelta) -> None:
    saga = Saga("slow")
    with pytest.raises(DefinitionError) as err:
        saga.add_step("a", act, timeout=timeout)
    assert_names(err, "slow", "a", "timeout must be positive")


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (Retry(max_attempts=0), "max_attempts must be at least 1"),
        (Retry(initial_delay=timedelta(seconds=-1)), "retry delays cannot be negative"),
        (Retry(max_delay=timedelta(seconds=-1)), "retry delays cannot be negative"),
        (Retry(backoff=0.5), "backoff must be 1.0 or more"),
        (Retry(jitter=-0.1), "jitter is a fraction between 0 and 1"),
        (Retry(jitter=1.5), "jitter is a fraction between 0 and 1"),
    ],
)
@pytest.mark.parametrize("which", ["retry", "compensation_retry"])
def test_bad_retry_policy(policy: Retry, words: str, which: str) -> None:
    saga = Saga("flaky")
    with pytest.raises(DefinitionError) as err:
        saga.add_step("a", act, **{which: policy})  # type: ignore[arg-type]
    assert_names(err, "flaky", "a", f"{which}: {words}")


@pytest.mark.parametrize("name", ["", "has space", "1starts_with_digit", "x" * 101, "semi;colon"])
def test_bad_saga_name(name: str) -> None:
    with pytest.raises(DefinitionError) as err:
        Saga(name)
    assert f"saga {name!r}:" in str(err.value)
    assert "a saga name is letters, digits" in str(err.value)


def test_bad_saga_version() -> None:
    with pytest.raises(DefinitionError) as err:
        Saga("v", version=0)
    assert_names(err, "v", None, "version must be 1 or more")


@pytest.mark.parametrize("name", ["", "has space", "x" * 101, "a/b"])
def test_bad_step_name(name: str) -> None:
    saga = Saga("named")
    with pytest.raises(DefinitionError) as err:
        saga.add_step(name, act)
    assert_names(err, "named", name or None, "a step name is letters, digits")


def test_action_and_compensation_must_be_callable() -> None:
    saga = Saga("calls")
    with pytest.raises(DefinitionError) as err:
        saga.add_step("a", "not a function")  # type: ignore[arg-type]
    assert_names(err, "calls", "a", "the action is not callable")
    with pytest.raises(DefinitionError) as err:
        saga.add_step("b", act, 42)  # type: ignore[arg-type]
    assert_names(err, "calls", "b", "the compensation is not callable")
    handle = saga.add_step("c", act)
    with pytest.raises(DefinitionError) as err:
        handle.compensate(42)  # type: ignore[arg-type]
    assert_names(err, "calls", "c", "the compensation is not callable")


def test_empty_saga() -> None:
    with pytest.raises(DefinitionError) as err:
        Saga("empty").validate()
    assert_names(err, "empty", None, "a saga needs at least one step")
    with pytest.raises(DefinitionError):
        Registry([Saga("empty")])


def test_a_failed_addition_leaves_the_saga_unchanged() -> None:
    saga = Saga("kept")
    saga.add_step("a", act)
    with pytest.raises(DefinitionError):
        saga.add_step("a", act)
    with pytest.raises(DefinitionError):
        saga.add_step("b", act, timeout=timedelta(0))
    assert [s.name for s in saga.steps] == ["a"]


# -- retry policy -------------------------------------------------------------


def test_delay_grows_by_backoff_from_the_initial_delay() -> None:
    policy = Retry(
        initial_delay=timedelta(milliseconds=100),
        backoff=3.0,
        jitter=0.0,
        max_delay=timedelta(hours=1),
    )
    assert [policy.delay_ms(n, 0.5) for n in (1, 2, 3, 4)] == [100, 300, 900, 2700]


def test_delay_is_capped_by_max_delay() -> None:
    policy = Retry(
        initial_delay=timedelta(seconds=1), backoff=2.0, jitter=0.0, max_delay=timedelta(seconds=5)
    )
    assert [policy.delay_ms(n, 0.5) for n in (1, 2, 3, 4, 5, 30)] == [
        1000,
        2000,
        4000,
        5000,
        5000,
        5000,
    ]


@pytest.mark.parametrize("attempt", [1, 2, 5])
def test_jitter_spreads_the_delay_within_its_bounds(attempt: int) -> None:
    policy = Retry(
        initial_delay=timedelta(seconds=1),
        backoff=2.0,
        jitter=0.25,
        max_delay=timedelta(seconds=10),
    )
    base = min(1000 * 2 ** (attempt - 1), 10_000)
    samples = [policy.delay_ms(attempt, r / 100) for r in range(100)]
    assert min(samples) == int(base * 0.75)
    assert max(samples) <= base * 1.25
    assert max(samples) > base * 1.2
    assert samples == sorted(samples)  # more randomness, longer wait: no surprises


def test_a_huge_attempt_number_waits_the_max_delay_instead_of_overflowing() -> None:
    policy = Retry(
        max_attempts=100_000,
        initial_delay=timedelta(seconds=1),
        backoff=2.0,
        jitter=0.0,
        max_delay=timedelta(minutes=1),
    )
    assert policy.delay_ms(5000, 0.5) == 60_000


def test_non_retryable_types() -> None:
    policy = Retry(non_retryable=(KeyError,))
    assert not policy.is_retryable(KeyError("x"))
    assert not policy.is_retryable(NonRetryableError("stop"))
    assert policy.is_retryable(ValueError("again"))
    assert NO_RETRY.max_attempts == 1


# -- helpers --------------------------------------------------------------------


def _ctx() -> StepContext:
    from engine.states import Phase

    return StepContext(
        "id", "trip", "corr", None, {}, {}, "hotel", Phase.ACTION, 1, "id:hotel:action"
    )


def test_ids_made_in_one_process_strictly_increase() -> None:
    import uuid

    from engine.model import new_id

    ids = [new_id(1_795_635_770_719) for _ in range(5000)]  # one millisecond, 5,000 ids
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)
