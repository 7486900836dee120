"""The old name of :mod:`engine.examples.order_fulfillment` (see the package)."""

import sys

from engine.examples import order_fulfillment

sys.modules[__name__] = order_fulfillment
