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
from typing import TYPE_CHECKING

import sqlalchemy as sa

from engine.states import ACTIVE_STATES
from engine.store import schema as t

if TYPE_CHECKING:
    from engine.runtime import SagaEngine

log = logging.getLogger(__name__)

_ACTIVE = [s.value for s in ACTIVE_STATES]


def recover(engine: SagaEngine, *, batch: int = 500) -> int:
    """Publish every active instance that is due now with a free lease; returns how many.

    Raises :class:`~engine.errors.TransportError` when the transport is down;
    what was published before stays published, and running it again is safe.
    """
    now = engine.clock()
    after: tuple[int, str] | None = None
    published = 0
    while True:
        page = due_page(engine, now, after, batch)
        for _, saga_id in page:
            engine.transport.publish(saga_id)
        published += len(page)
        if len(page) < batch:
            break
        after = page[-1]
    if published:
        log.info("recovery: rang again for %d instances whose work is due", published)
    return published


def due_page(
    engine: SagaEngine, now: int, after: tuple[int, str] | None, limit: int
) -> list[tuple[int, str]]:
    """Up to ``limit`` (next_run_at, id) of due, unleased instances, after ``after``."""
    i = t.instances.c
    free = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
    query = sa.select(i.next_run_at, i.id).where(i.state.in_(_ACTIVE), i.next_run_at <= now, free)
    if after is not None:
        query = query.where(sa.tuple_(i.next_run_at, i.id) > sa.tuple_(*after))
    query = query.order_by(i.next_run_at, i.id).limit(limit)
    with engine.store.db.connect() as conn:
        return [(row.next_run_at, row.id) for row in conn.execute(query)]
