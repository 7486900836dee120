"""Book a trip with remote participants: hotel, flight and car are services of their own.

The saga of :mod:`engine.examples.travel_booking`, but each step is a command to a
participant service (:mod:`engine.examples.remote_participants`) instead of a
function call: the worker sends ``hotel.reserve`` on the hotel service's
command stream, the hotel process replies, and the worker records the reply
and sends the next command. On failure the compensations (``car.return``,
``flight.cancel``, ``hotel.cancel``) go out in reverse order the same way.

With Redis and PostgreSQL, one process per service::

    export SAGA_DATABASE_URL=postgresql://postgres@127.0.0.1/saga
    export SAGA_REDIS_URL=redis://127.0.0.1:6379/0
    saga db upgrade
    saga -A engine.examples.remote_participants participant --service hotel &
    saga -A engine.examples.remote_participants participant --service flight &
    saga -A engine.examples.remote_participants participant --service car &
    saga -A engine.examples.travel_booking_remote worker &
    saga -A engine.examples.travel_booking_remote start book_trip_remote \\
        --payload '{"traveller": "Ada", "fail": {"car": "permanent"}}'

Without ``SAGA_REDIS_URL`` the worker runs the three participants as threads
of its own process (see :func:`init_engine`), so ``saga -A
engine.examples.travel_booking_remote worker`` alone works on SQLite too.

The payload is the one :mod:`engine.examples.travel_booking` takes, faults included.
Each step waits 2.5 s for its reply (the ``timeout`` fault hangs longer) and
is tried up to five times: a participant process may be restarting.
"""

from __future__ import annotations

from datetime import timedelta

from engine import Retry, Saga, SagaEngine
from engine.examples import remote_participants

RETRY = Retry(
    max_attempts=5,
    initial_delay=timedelta(milliseconds=200),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
)
COMPENSATION_RETRY = Retry(
    max_attempts=8,
    initial_delay=timedelta(milliseconds=200),
    backoff=2.0,
    max_delay=timedelta(seconds=2),
)

book_trip_remote = Saga(
    "book_trip_remote",
    version=1,
    default_timeout=timedelta(seconds=2.5),
    default_retry=RETRY,
    default_compensation_retry=COMPENSATION_RETRY,
)
book_trip_remote.remote_step("reserve_hotel", "hotel.reserve", compensation="hotel.cancel")
book_trip_remote.remote_step("book_flight", "flight.book", compensation="flight.cancel")
book_trip_remote.remote_step("rent_car", "car.rent", compensation="car.return")


def init_engine(engine: SagaEngine) -> None:
    """Without Redis, run the participants in this process (called by ``saga worker``)."""
    if not engine.bus.in_process:
        return  # they run as processes of their own: `saga participant`
    remote_participants.bind(engine.store.db)
    engine.participant(remote_participants.service).start()
