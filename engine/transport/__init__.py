"""What carries messages between processes: one protocol per kind, in-process beside Redis.

- doorbells (:mod:`.doorbells`, :mod:`.redis_doorbells`): "look at saga X", for workers;
- the command bus (:mod:`.commands`, :mod:`.redis_streams`): remote steps' commands and
  participants' replies;
- the event log (:mod:`.event_log`): domain events of choreographed sagas.

Each kind is a ``Protocol`` with an in-process implementation (the embedded default) and
a Redis Streams one; :mod:`.redis_streams` is the one home of the consumer-group mechanics
they share, and :mod:`.streams` holds the entry and poison-record shapes every reader sees.
Nothing here knows what a message means.
"""
