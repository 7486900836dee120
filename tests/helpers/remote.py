"""Remote sagas for tests, and the participant service that answers them.

The handlers are the test :class:`~tests.helpers.participant.Participant`'s
own action and compensation, so the payload steers a remote step exactly as
it steers an in-process one (``fail``, ``fatal``, ``sleep``, ``block_while``,
``pause_ms``...), and every call and effect is recorded.
"""

from __future__ import annotations

from datetime import timedelta

from engine import Retry, Saga
from engine.remote.participant import ParticipantService
from tests.helpers.participant import Participant
from tests.helpers.sagas import QUICK

STEPS = ("hotel", "flight", "car")


def remote_travel(
    *,
    name: str = "rtravel",
    timeout: float = 10.0,
    timeouts: dict[str, float] | None = None,
    retry: Retry = QUICK,
    comp_retry: Retry = QUICK,
) -> Saga:
    """hotel, flight, car: each a command to the ``<step>`` service, each compensatable."""
    saga = Saga(
        name,
        default_retry=retry,
        default_compensation_retry=comp_retry,
        default_timeout=timedelta(seconds=timeout),
    )
    for step in STEPS:
        seconds = (timeouts or {}).get(step)
        saga.remote_step(
            step,
            f"{step}.do",
            compensation=f"{step}.undo",
            timeout=timedelta(seconds=seconds) if seconds else None,
        )
    return saga.validate()


def approval(*, timeout: float = 30.0, retry: Retry | None = None) -> Saga:
    """hotel (remote), then wait for ``manager_approval``, then car (remote)."""
    saga = Saga(
        "approval",
        default_retry=QUICK,
        default_compensation_retry=QUICK,
        default_timeout=timedelta(seconds=10),
    )
    saga.remote_step("hotel", "hotel.do", compensation="hotel.undo")
    saga.wait_for("manager_approval", timeout=timedelta(seconds=timeout), retry=retry)
    saga.remote_step("car", "car.do", compensation="car.undo")
    return saga.validate()


def service(p: Participant, name: str = "test-participants") -> ParticipantService:
    """Handlers for ``<step>.do`` and ``<step>.undo`` of every test step."""
    handlers = ParticipantService(name)
    for step in STEPS:
        handlers.add_handler(f"{step}.do", p.action)
        handlers.add_handler(f"{step}.undo", p.compensation)
    return handlers
