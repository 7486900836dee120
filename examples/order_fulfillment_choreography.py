"""The old name of :mod:`engine.examples.order_fulfillment_choreography` (see the package)."""

import sys

from engine.examples import order_fulfillment_choreography

sys.modules[__name__] = order_fulfillment_choreography
