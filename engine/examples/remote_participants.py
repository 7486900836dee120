"""The hotel, flight and car services of the remote travel booking, as participant handlers.

Each service runs as its own process, reading its own command stream::

    saga -A engine.examples.remote_participants participant --service hotel
    saga -A engine.examples.remote_participants participant --service flight
    saga -A engine.examples.remote_participants participant --service car

(without ``--service``, one process serves all three). The saga that sends
them commands is :mod:`engine.examples.travel_booking_remote`. Each participant keeps
its records in its own table (``hotel_reservations``, ``flight_bookings``,
``car_rentals``) and makes or undoes each record once per idempotency key,
behind the engine's :class:`~engine.IdempotencyGuard` (see
:mod:`engine.examples.participants`, which also lists the faults a payload may ask
for). So a command delivered twice (a participant died before acknowledging
it, or Redis lost it and the worker sent it again) has its effect once.

The tables live in ``SAGA_DATABASE_URL``'s database, for the example's sake;
a real service would keep them in a database of its own, next to its guard's
key table (``saga db upgrade`` on that database creates it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine as SAEngine

from engine import StepContext
from engine.examples.participants import Participant
from engine.remote.participant import ParticipantRuntime, ParticipantService
from engine.settings import Settings
from engine.store import open_store

hotels = Participant("hotel", "hotel_reservations")
flights = Participant("flight", "flight_bookings")
cars = Participant("car", "car_rentals")
PARTICIPANTS = (hotels, flights, cars)

service = ParticipantService("travel")


def bind(db: SAEngine) -> None:
    """Keep the participants' records (and their guard's keys) in ``db``."""
    for participant in PARTICIPANTS:
        participant.bind(db)


def init_participant(runtime: ParticipantRuntime) -> None:
    """Bind to SAGA_DATABASE_URL (called by ``saga participant`` once it built the runtime)."""
    settings = runtime.settings or Settings.from_env()
    bind(open_store(settings.database_url, pool_size=runtime.concurrency).db)


@service.handler("hotel.reserve")
def reserve_hotel(ctx: StepContext) -> dict[str, Any]:
    return hotels.act(
        ctx, {"hotel": _get(ctx, "hotel", "Hotel Adlon"), "nights": _get(ctx, "nights", 2)}
    )


@service.handler("hotel.cancel")
def cancel_hotel(ctx: StepContext, reservation: dict[str, Any] | None) -> bool:
    return hotels.undo(ctx)


@service.handler("flight.book")
def book_flight(ctx: StepContext) -> dict[str, Any]:
    return flights.act(
        ctx,
        {
            "flight": _get(ctx, "flight", "LH 1234"),
            "traveller": _get(ctx, "traveller", "Ada Lovelace"),
        },
    )


@service.handler("flight.cancel")
def cancel_flight(ctx: StepContext, booking: dict[str, Any] | None) -> bool:
    return flights.undo(ctx)


@service.handler("car.rent")
def rent_car(ctx: StepContext) -> dict[str, Any]:
    return cars.act(ctx, {"car": _get(ctx, "car", "compact"), "days": _get(ctx, "nights", 2)})


@service.handler("car.return")
def return_car(ctx: StepContext, rental: dict[str, Any] | None) -> bool:
    return cars.undo(ctx)


def _get(ctx: StepContext, field: str, default: Any) -> Any:
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return payload.get(field, default)
