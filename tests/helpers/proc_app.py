"""A module for ``saga -A tests.helpers.proc_app worker|participant`` in process tests.

The test sagas (in-process ``travel``, remote ``rtravel``) and the remote
handlers, all recording calls and effects through a test
:class:`~tests.helpers.participant.Participant` on ``SAGA_DATABASE_URL``, so a
test can count them from outside the processes.
"""

from __future__ import annotations

from engine import Settings
from tests.helpers.participant import Participant
from tests.helpers.remote import remote_travel, service
from tests.helpers.sagas import travel

participant = Participant(Settings.from_env().database_url)
travel_saga = travel(participant)
remote_saga = remote_travel(timeout=5.0)
handlers = service(participant)
