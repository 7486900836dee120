"""Ring again for every instance whose work is due: recovery after the queue lost its messages.

Redis may lose every doorbell (FLUSHALL, a restart without persistence, a
trimmed stream). The store still has every instance, so :func:`recover`
walks the active instances whose work is due and whose lease is free, and
publishes each one. It is idempotent (a repeated doorbell finds the lease
taken or nothing to do) and reads in bounded batches along the store's
partial index on ``next_run_at``. Workers run it when they start; the
sweeps schedule it.
"""

from __future__ import annotations

import logging

from engine.collaborators import Collaborators

log = logging.getLogger(__name__)


def recover(collaborators: Collaborators, *, batch: int = 500) -> int:
    """Publish every active instance that is due now with a free lease; returns how many.

    Raises :class:`~engine.errors.TransportError` when the transport is down;
    what was published before stays published, and running it again is safe.
    """
    c = collaborators
    now = c.clock()
    after: tuple[int, str] | None = None
    published = 0
    while True:
        page = c.store.sweeps.due_unleased(now, after, batch)
        for _, saga_id in page:
            c.transport.publish(saga_id)
        published += len(page)
        if len(page) < batch:
            break
        after = page[-1]
    if published:
        log.info("recovery: rang again for %d instances whose work is due", published)
    return published
