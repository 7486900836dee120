"""The old name of :mod:`engine.examples.participants` (see the package)."""

import sys

from engine.examples import participants

sys.modules[__name__] = participants
