"""The old name of :mod:`engine.examples.travel_booking_remote` (see the package)."""

import sys

from engine.examples import travel_booking_remote

sys.modules[__name__] = travel_booking_remote
