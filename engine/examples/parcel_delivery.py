"""Ship a parcel: reserve a courier, a service of its own, then print the label.

The courier is a remote participant: the worker sends ``courier.reserve`` on the
courier service's command stream (Redis with ``SAGA_REDIS_URL``, else this
process's queues) and records its reply. The courier usually answers within a
second; one that hangs leaves the step waiting for its reply for up to ten
minutes (the step's timeout), and past what it is expected to take (plus the
saga's grace) the sweeper flags the saga **stuck**. The operator then waits, or
force-compensates: the courier's reservation is released once it answers. ::

    saga -A engine.examples.parcel_delivery worker          # runs the courier too
    saga -A engine.examples.parcel_delivery start ship_parcel \\
        --payload '{"parcel": "P-1", "fail": {"courier": "slow:60"}}'

With Redis, the courier may run as a process of its own instead
(``saga -A engine.examples.parcel_delivery participant``). Faults go to the
``courier`` participant (:mod:`engine.examples.participants`): ``slow:N`` makes it
take N seconds before it answers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from engine import Retry, Saga, SagaEngine, StepContext
from engine.examples.participants import Participant
from engine.remote.participant import ParticipantRuntime, ParticipantService
from engine.settings import Settings
from engine.store import open_store

#: How long the courier usually takes; past it (plus the grace) the saga is stuck.
EXPECTED_COURIER = timedelta(seconds=2)

couriers = Participant("courier", "courier_bookings", undone_status="released")
labels = Participant("label", "parcel_labels")
PARTICIPANTS = (couriers, labels)

service = ParticipantService("courier")

ship_parcel = Saga(
    "ship_parcel",
    version=1,
    default_timeout=timedelta(seconds=30),
    default_retry=Retry(max_attempts=3, initial_delay=timedelta(milliseconds=200)),
    # Short, for the example: flagged stuck soon after the courier overruns.
    stuck_grace=timedelta(seconds=5),
)
ship_parcel.remote_step(
    "reserve_courier",
    "courier.reserve",
    compensation="courier.release",
    timeout=timedelta(minutes=10),
    expected_duration=EXPECTED_COURIER,
)


@ship_parcel.step(expected_duration=timedelta(seconds=1))
def print_label(ctx: StepContext) -> dict[str, Any]:
    courier = ctx.outputs.get("reserve_courier") or {}
    return labels.act(ctx, {"parcel": _get(ctx, "parcel", "P-1"), "courier": courier.get("id")})


@print_label.compensate
def void_label(ctx: StepContext, label: dict[str, Any] | None) -> None:
    labels.undo(ctx)


@service.handler("courier.reserve")
def reserve_courier(ctx: StepContext) -> dict[str, Any]:
    return couriers.act(ctx, {"parcel": _get(ctx, "parcel", "P-1")})


@service.handler("courier.release")
def release_courier(ctx: StepContext, booking: dict[str, Any] | None) -> bool:
    return couriers.undo(ctx)


def init_engine(engine: SagaEngine) -> None:
    """Bind the participants to the engine's database and run the courier in this process
    (called by ``saga -A``; ``saga demo`` too)."""
    bind(engine)
    # Up to 16 at once: a hung courier holds one, and the others go on answering.
    engine.participant(service, concurrency=16).start()


def bind(engine: SagaEngine) -> None:
    for participant in PARTICIPANTS:
        participant.bind(engine.store.db)


def init_participant(runtime: ParticipantRuntime) -> None:
    """Bind to SAGA_DATABASE_URL (called by ``saga participant`` once it built the runtime)."""
    settings = runtime.settings or Settings.from_env()
    db = open_store(settings.database_url, pool_size=runtime.concurrency).db
    for participant in PARTICIPANTS:
        participant.bind(db)


def _get(ctx: StepContext, field: str, default: Any) -> Any:
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return payload.get(field, default)
