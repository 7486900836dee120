"""Finding lost work: the sweeps, run on a schedule by one leader at a time.

- :mod:`.passes`: each sweep (overdue deadlines, lost doorbells, stuck instances,
  dead-letter auto-retry, retention), as one pass over the store;
- :mod:`.doorbells`: ring again for every instance whose work is due (after the
  queue lost its messages; workers run it at start-up too);
- :mod:`.scheduler`: APScheduler runs the passes on their intervals, only in the
  leader (:mod:`engine.store.leader`).
"""
