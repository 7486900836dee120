"""Book a trip: reserve a hotel, book a flight, rent a car; undo them in reverse on failure.

Every step is compensatable: if the car cannot be rented, the flight is
cancelled, then the hotel. Run it with the engine's CLI::

    saga -A engine.examples.travel_booking db upgrade
    saga -A engine.examples.travel_booking start book_trip --business-key T-1001 \\
        --payload '{"traveller": "Ada", "hotel": "Adlon", "nights": 3, "flight": "LH 1234"}'
    saga -A engine.examples.travel_booking worker

Payload
-------
``traveller``, ``hotel``, ``nights``, ``flight``, ``car`` (all optional;
defaults stand in for missing ones). To choose an outcome, add faults by
participant (``hotel``, ``flight``, ``car``); the rules are in
:mod:`engine.examples.participants`::

    {"fail": {"flight": "flaky:2"}}                 flight fails twice, then the trip completes
    {"fail": {"car": "permanent"}}                  no car: flight, then hotel, are cancelled
    {"fail": {"car": "timeout"}}                    the car desk never answers: car (its outcome
                                                    is unknown), flight and hotel are cancelled
    {"fail": {"car": "permanent"},
     "fail_compensation": {"flight": "always"}}     the flight cannot be cancelled: dead-lettered

Each participant keeps its records in its own table (``hotel_reservations``,
``flight_bookings``, ``car_rentals``); a cancelled record has status
``cancelled``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from engine import Retry, Saga, SagaEngine, StepContext
from engine.examples.participants import Participant

#: Quick retries, so the example and the demo move along.
RETRY = Retry(
    max_attempts=3,
    initial_delay=timedelta(milliseconds=200),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
)
COMPENSATION_RETRY = Retry(
    max_attempts=4,
    initial_delay=timedelta(milliseconds=200),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
)

hotels = Participant("hotel", "hotel_reservations")
flights = Participant("flight", "flight_bookings")
cars = Participant("car", "car_rentals")
PARTICIPANTS = (hotels, flights, cars)

book_trip = Saga(
    "book_trip",
    version=1,
    default_timeout=timedelta(seconds=2),
    default_retry=RETRY,
    default_compensation_retry=COMPENSATION_RETRY,
)


def init_engine(engine: SagaEngine) -> None:
    """Bind the participants to the engine's database (called by ``saga -A``)."""
    for participant in PARTICIPANTS:
        participant.bind(engine.store.db)


@book_trip.step
def reserve_hotel(ctx: StepContext) -> dict[str, Any]:
    return hotels.act(
        ctx, {"hotel": _get(ctx, "hotel", "Hotel Adlon"), "nights": _get(ctx, "nights", 2)}
    )


@reserve_hotel.compensate
def cancel_hotel(ctx: StepContext, reservation: dict[str, Any] | None) -> None:
    hotels.undo(ctx)


@book_trip.step
def book_flight(ctx: StepContext) -> dict[str, Any]:
    return flights.act(
        ctx,
        {
            "flight": _get(ctx, "flight", "LH 1234"),
            "traveller": _get(ctx, "traveller", "Ada Lovelace"),
        },
    )


@book_flight.compensate
def cancel_flight(ctx: StepContext, booking: dict[str, Any] | None) -> None:
    flights.undo(ctx)


@book_trip.step
def rent_car(ctx: StepContext) -> dict[str, Any]:
    return cars.act(ctx, {"car": _get(ctx, "car", "compact"), "days": _get(ctx, "nights", 2)})


@rent_car.compensate
def return_car(ctx: StepContext, rental: dict[str, Any] | None) -> None:
    cars.undo(ctx)


def _get(ctx: StepContext, field: str, default: Any) -> Any:
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return payload.get(field, default)
