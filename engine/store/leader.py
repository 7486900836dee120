"""Who leads the sweeps: one lock per store, held for as long as a sweeper leads.

- on PostgreSQL, the leader holds a session advisory lock
  (``pg_try_advisory_lock``) on a connection of its own for as long as it
  leads. If that process dies or loses its connection, the server drops the
  lock and another sweeper takes over at its next tick.
- on SQLite, which lives on one host, the leader holds an exclusive
  ``flock`` on ``<database file>.sweeper.lock``; an in-memory database has
  one process anyway, and a lock in that process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import SQLAlchemyError

from engine.store.instances import Store

log = logging.getLogger(__name__)


#: The advisory lock key every sweeper of a database agrees on (b"sagaswe" as a number).
ADVISORY_KEY = int.from_bytes(b"sagaswe", "big")


class LeaderLock(Protocol):
    """Held by at most one sweeper of a store at a time."""

    def acquire(self) -> bool:
        """Take the lock, or confirm it is still held; False when another holds it."""

    def release(self) -> None:
        """Let another sweeper take over."""


class PostgresLock:
    """A session advisory lock on a connection kept open while it is held."""

    def __init__(self, db: SAEngine, key: int = ADVISORY_KEY) -> None:
        self.db = db
        self.key = key
        self._conn: sa.Connection | None = None

    def acquire(self) -> bool:
        if self._conn is not None:
            if self._alive(self._conn):
                return True
            log.warning("sweeper: the connection holding the sweeper lock was lost")
            self._drop()
        try:
            conn = self.db.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            log.warning("sweeper: cannot reach the store to take the lock: %s", exc)
            return False
        taken = _try(conn, "SELECT pg_try_advisory_lock(:key)", self.key)
        if taken:
            self._conn = conn  # keep it: the lock lives as long as this session
        else:
            conn.close()
        return taken

    def release(self) -> None:
        if self._conn is None:
            return
        _try(self._conn, "SELECT pg_advisory_unlock(:key)", self.key)
        self._drop()

    def _alive(self, conn: sa.Connection) -> bool:
        # pg_try_advisory_lock again would stack a second hold on the same session.
        return _try(conn, "SELECT true", None)

    def _drop(self) -> None:
        assert self._conn is not None
        try:
            self._conn.close()
        except SQLAlchemyError:  # already broken; the server ended the session and its lock
            log.debug("sweeper: closing the lock connection failed", exc_info=True)
        self._conn = None


def _try(conn: sa.Connection, sql: str, key: int | None) -> bool:
    try:
        return bool(conn.execute(sa.text(sql), {"key": key} if key is not None else {}).scalar())
    except SQLAlchemyError as exc:
        log.warning("sweeper: lock query failed: %s", exc)
        conn.invalidate()
        return False


class FileLock:
    """An exclusive ``flock`` on a file next to the SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ProcessLock:
    """One holder per process: for an in-memory SQLite database."""

    _held = threading.Lock()

    def __init__(self) -> None:
        self._mine = False

    def acquire(self) -> bool:
        if not self._mine:
            self._mine = self._held.acquire(blocking=False)
        return self._mine

    def release(self) -> None:
        if self._mine:
            self._held.release()
            self._mine = False


def lock_for(store: Store) -> LeaderLock:
    """The sweeper lock that fits ``store``'s backend."""
    if store.dialect == "postgresql":
        return PostgresLock(store.db)
    database = store.db.url.database
    if not database or database == ":memory:":
        return ProcessLock()
    return FileLock(Path(f"{database}.sweeper.lock"))
