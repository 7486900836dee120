"""Leases on instance rows: who owns an instance, until when (``lease_owner``,
``lease_expires_at``). A worker claims with a conditional UPDATE, so that two
never own one instance; the statements here run on a connection the store gives.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from engine.states import ACTIVE_STATES
from engine.store import schema as t

ACTIVE = [s.value for s in ACTIVE_STATES]
# The literal state predicate, as the partial indexes spell it: with a bound
# parameter, a prepared statement's generic plan could not prove that the
# partial index applies and would scan the whole table instead.
ACTIVE_SQL = sa.text(f"saga_instances.{t.ACTIVE}")


def claim(c: Connection, saga_id: str, owner: str, ttl_ms: int, now: int) -> bool:
    """Take the lease on one active instance if nobody holds it; False if taken or idle."""
    i = t.instances.c
    taken = c.execute(
        t.instances.update()
        .where(
            i.id == saga_id,
            i.state.in_(ACTIVE),
            # Not re-entrant for ``owner``: a second thread (or a process
            # reusing the worker id) would run the same step concurrently.
            sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now),
        )
        .values(lease_owner=owner, lease_expires_at=now + ttl_ms)
    ).rowcount
    return bool(taken)


def claimable(now: int, limit: int, sagas: Collection[tuple[str, int]] | None) -> sa.Select[Any]:
    """The ids of up to ``limit`` active instances whose work is due and nobody leases, or
    whose lease expired, due first; only of ``sagas`` (name, version) when given."""
    i = t.instances.c
    due = sa.and_(i.lease_owner.is_(None), i.next_run_at <= now)
    expired = sa.and_(i.lease_owner.is_not(None), i.lease_expires_at < now)
    query = (
        sa.select(i.id)
        .where(i.state.in_(ACTIVE), sa.or_(due, expired))
        .order_by(i.next_run_at)
        .limit(limit)
    )
    if sagas is not None:
        query = query.where(sa.tuple_(i.saga_name, i.saga_version).in_(list(sagas)))
    return query


def lease(c: Connection, saga_ids: Sequence[str], owner: str, ttl_ms: int, now: int) -> None:
    """Give ``owner`` the lease on instances picked (and locked) by :func:`claimable`."""
    i = t.instances.c
    c.execute(
        t.instances.update()
        .where(i.id.in_(saga_ids))
        .values(lease_owner=owner, lease_expires_at=now + ttl_ms)
    )


def renew(c: Connection, owner: str, saga_ids: Sequence[str], ttl_ms: int, now: int) -> int:
    """Extend the leases ``owner`` still holds; returns how many."""
    i = t.instances.c
    return int(
        c.execute(
            t.instances.update()
            .where(i.id.in_(list(saga_ids)), i.lease_owner == owner)
            .values(lease_expires_at=now + ttl_ms)
        ).rowcount
    )


def release(c: Connection, saga_id: str, owner: str) -> None:
    """Drop ``owner``'s lease on the instance (nothing when another holds it)."""
    i = t.instances.c
    c.execute(
        t.instances.update()
        .where(i.id == saga_id, i.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
    )


def clear_expired(c: Connection, saga_id: str, now: int) -> bool:
    """Drop a lease that expired, whoever held it; False if it was renewed or taken."""
    i = t.instances.c
    done = c.execute(
        t.instances.update()
        .where(i.id == saga_id, i.lease_owner.is_not(None), i.lease_expires_at < now)
        .values(lease_owner=None, lease_expires_at=None)
    ).rowcount
    return bool(done)


def free(saga_id: str, now: int) -> sa.Select[Any]:
    """The id of the instance if it is active and no live lease holds it."""
    i = t.instances.c
    unleased = sa.or_(i.lease_owner.is_(None), i.lease_expires_at < now)
    return sa.select(i.id).where(i.id == saga_id, ACTIVE_SQL, unleased)
