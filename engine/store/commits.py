"""Transactions, and the work that waits for their commit.

What a stored transition sets off outside the database (a counter moved, a
duplicate counted) must happen only if the transition is really stored: not
when its transaction rolls back, and once when it is retried. So the store's
transactions keep a list of such work, :func:`after_commit` adds to it, and the
list runs once COMMIT returned; a rollback drops it, and a rolled-back
savepoint drops what was added since it began.

The list belongs to the connection of a transaction :func:`transaction`
opened. On any other connection (autocommit, where each statement committed
when it returned; or a transaction of the caller's own, whose commit the
store does not see) the work runs at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection
from sqlalchemy.engine import Engine

from engine.model import Event, Instance

log = logging.getLogger(__name__)

#: Told of each stored transition once its transaction committed: the instance
#: before it (None for a new one), the instance after it, and its events.
TransitionHook = Callable[[Instance | None, Instance, Sequence[Event]], None]

Work = Callable[[], None]

# The work waiting for each open transaction, by its connection. Each thread
# touches only the entries of its own connections; single dict operations are
# atomic, so no lock is needed.
_waiting: dict[Connection, list[Work]] = {}


def ignore_transitions(old: Instance | None, new: Instance, events: Sequence[Event]) -> None:
    """A :data:`TransitionHook` that does nothing (a store built without one)."""


@contextmanager
def transaction(db: Engine) -> Iterator[Connection]:
    """One transaction on ``db``: commits on success, rolls back on error. The work
    :func:`after_commit` queued in it runs after the commit, and only then."""
    with db.begin() as conn:
        work: list[Work] = []
        _waiting[conn] = work
        try:
            yield conn
        finally:
            del _waiting[conn]
    run(work)


def after_commit(conn: Connection, work: Work) -> None:
    """Run ``work`` once the transaction of ``conn`` committed; at once on a connection
    that is not in a transaction :func:`transaction` opened."""
    queued = _waiting.get(conn)
    if queued is None:
        run((work,))
    else:
        queued.append(work)


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """A savepoint in ``conn``'s transaction: an error inside rolls back to it, forgets
    the work queued since it began, and goes on up."""
    queued = _waiting.get(conn)
    mark = len(queued) if queued is not None else 0
    try:
        with conn.begin_nested():
            yield
    except BaseException:
        if queued is not None:
            del queued[mark:]
        raise


def run(work: Sequence[Work]) -> None:
    """Run work whose transaction committed, each piece whatever the others do."""
    for piece in work:
        try:
            piece()
        except Exception:
            # The transaction committed: a side effect that failed must not make the
            # caller believe otherwise (and store the transition again). Logged whole.
            log.exception("work after a commit failed")
