"""The old name of :mod:`engine.examples.travel_booking` (see the package)."""

import sys

from engine.examples import travel_booking

sys.modules[__name__] = travel_booking
