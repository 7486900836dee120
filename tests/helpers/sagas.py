"""The sagas the engine tests run, built around a :class:`Participant`.

Every step calls the participant, whose behaviour the payload steers, so
the same definitions serve every scenario and every process.
"""

from __future__ import annotations

from datetime import timedelta

from engine import Retry, Saga
from engine.states import StepKind
from tests.helpers.participant import Participant

#: Short real delays: a test that retries waits tens of milliseconds, not seconds.
QUICK = Retry(
    max_attempts=3,
    initial_delay=timedelta(milliseconds=20),
    backoff=2.0,
    max_delay=timedelta(seconds=1),
    jitter=0.1,
)
#: The flaky-step policy whose backoff a test measures.
FLAKY = Retry(
    max_attempts=3,
    initial_delay=timedelta(milliseconds=150),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
    jitter=0.1,
)


def travel(
    p: Participant,
    *,
    timeouts: dict[str, float] | None = None,
    retries: dict[str, Retry] | None = None,
    retry: Retry = QUICK,
    comp_retry: Retry = QUICK,
    name: str = "travel",
) -> Saga:
    """Hotel, flight, car: each compensatable."""
    saga = Saga(
        name,
        default_retry=retry,
        default_compensation_retry=comp_retry,
        default_timeout=timedelta(seconds=10),
    )
    for step in ("hotel", "flight", "car"):
        seconds = (timeouts or {}).get(step)
        saga.add_step(
            step,
            p.action,
            p.compensation,
            timeout=timedelta(seconds=seconds) if seconds else None,
            retry=(retries or {}).get(step),
        )
    return saga.validate()


def order(p: Participant) -> Saga:
    """Reserve (compensatable), charge (the pivot), ship (retriable)."""
    saga = Saga(
        "order",
        default_retry=QUICK,
        default_compensation_retry=QUICK,
        default_timeout=timedelta(seconds=10),
    )
    saga.add_step("reserve", p.action, p.compensation)
    saga.add_step("charge", p.action, kind=StepKind.PIVOT)
    saga.add_step("ship", p.action)
    return saga.validate()


def ledger(p: Participant) -> Saga:
    """Two transactional steps writing with the engine's own connection."""
    saga = Saga("ledger", default_retry=QUICK, default_compensation_retry=QUICK)
    saga.add_step("debit", p.transactional, transactional=True)
    saga.add_step("credit", p.transactional, transactional=True)
    return saga.validate()


def mixed(p: Participant) -> Saga:
    """In-process and transactional steps interleaved, each with a compensation."""
    saga = Saga("mixed", default_retry=QUICK, default_compensation_retry=QUICK)
    saga.add_step("hotel", p.action, p.compensation)
    saga.add_step("debit", p.transactional, p.transactional_undo, transactional=True)
    saga.add_step("points", p.transactional, p.transactional_undo, transactional=True)
    saga.add_step("car", p.action, p.compensation)
    return saga.validate()


def all_sagas(p: Participant) -> list[Saga]:
    """Everything a worker process knows."""
    return [travel(p), order(p), ledger(p), mixed(p)]
