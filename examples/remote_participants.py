"""The old name of :mod:`engine.examples.remote_participants` (see the package)."""

import sys

from engine.examples import remote_participants

sys.modules[__name__] = remote_participants
