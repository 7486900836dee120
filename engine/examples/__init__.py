"""Example sagas and their pretend participants, shipped with the engine for ``saga demo``.

``travel_booking`` and ``order_fulfillment`` run in-process; ``expense_approval``
waits for a manager's signal; ``parcel_delivery`` sends its first step to a courier
service (in this process, or over Redis); the demo runs all four.
``travel_booking_remote`` sends its steps to the participant services of
``remote_participants``; ``order_fulfillment_choreography`` is the same order
as a choreography. ``participants`` holds the pretend services and the faults
a payload may ask for. Name them with ``-A``, e.g. ``saga -A
engine.examples.travel_booking worker``.
"""
