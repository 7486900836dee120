"""Runs the sweeps on their intervals (APScheduler 3), in one sweeper at a time.

Any number of sweeper processes may run (``saga sweeper``, ``saga worker
--sweeper``, the demo); before each sweep, each one tries to become the
leader, and only the leader sweeps:

- on PostgreSQL, the leader holds a session advisory lock
  (``pg_try_advisory_lock``) on a connection of its own for as long as it
  leads. If that process dies or loses its connection, the server drops the
  lock and another sweeper takes over at its next tick.
- on SQLite, which lives on one host, the leader holds an exclusive
  ``flock`` on ``<database file>.sweeper.lock``; an in-memory database has
  one process anyway, and a lock in that process.

The sweeps run one after another on one scheduler thread, so they never
compete with each other for the store.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.base import BaseScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.blocking import BlockingScheduler  # type: ignore[import-untyped]
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import SQLAlchemyError

from engine import metrics
from engine.errors import TransportError
from engine.executor import Clock
from engine.store import Store
from engine.sweeps import SWEEPS, Counts, Sweeps

if TYPE_CHECKING:
    from engine.app import SagaEngine

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


class Sweeper:
    """Runs the sweeps on their intervals while this process leads.

    ``start()`` runs them on a background thread (in a worker or the demo);
    ``run_forever(stop)`` blocks the calling thread (``saga sweeper``);
    ``run_once()`` is one full pass, for a test, a benchmark or cron.
    """

    def __init__(
        self, engine: SagaEngine, *, lock: LeaderLock | None = None, clock: Clock | None = None
    ) -> None:
        self.engine = engine
        self.sweeps = Sweeps(engine, clock=clock)
        self.lock = lock or lock_for(engine.store)
        self._leading = False
        self._mutex = threading.Lock()
        self._scheduler: BaseScheduler | None = None

    @property
    def leading(self) -> bool:
        return self._leading

    def run_once(self) -> dict[str, Counts] | None:
        """Every sweep once if this sweeper leads; None when another one does."""
        with self._mutex:
            return self.sweeps.run_all() if self._lead() else None

    def tick(self, name: str) -> Counts | None:
        """One scheduled sweep; errors are logged, and the next tick tries again."""
        with self._mutex:
            if not self._lead():
                return None
            try:
                return self.sweeps.run(name)
            except (SQLAlchemyError, TransportError) as exc:
                # Every write is one transaction: nothing was half done.
                log.warning("sweep %s failed, retried at its next tick: %s", name, exc)
                return None

    def start(self) -> Sweeper:
        """Run the sweeps on a background thread of this process."""
        scheduler = BackgroundScheduler(**_scheduler_options())
        self._schedule(scheduler)
        scheduler.start()
        self._scheduler = scheduler
        return self

    def run_forever(self, stop: threading.Event) -> None:
        """Run the sweeps in this thread until ``stop`` is set, then give up the lock."""
        scheduler = BlockingScheduler(**_scheduler_options())
        self._schedule(scheduler)
        self._scheduler = scheduler
        threading.Thread(
            target=lambda: (stop.wait(), scheduler.shutdown()),
            name="saga-sweeper-stop",
            daemon=True,
        ).start()
        try:
            scheduler.start()
        finally:
            self._resign()

    def stop(self) -> None:
        """Stop the schedule (waiting for a sweep in progress) and give up the lock."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._resign()

    def _schedule(self, scheduler: BaseScheduler) -> None:
        settings = self.engine.settings
        every = {
            "dispatch": settings.sweep_dispatch_seconds,
            "stuck": settings.sweep_stuck_seconds,
            "dead_letters": settings.sweep_dead_letter_seconds,
            "retention": settings.sweep_retention_seconds,
        }
        first = datetime.now(UTC)
        for name in SWEEPS:
            scheduler.add_job(
                self.tick,
                "interval",
                args=[name],
                seconds=every[name],
                id=f"saga-sweep-{name}",
                name=f"saga sweep {name}",
                next_run_time=first,
            )

    def _lead(self) -> bool:
        leading = self.lock.acquire()
        if leading != self._leading:
            owner = self.engine.settings.worker_id
            if leading:
                log.info("sweeper %s leads: running the sweeps", owner)
            else:
                log.info("sweeper %s stands by: another sweeper leads", owner)
            self._leading = leading
            metrics.SWEEPER_LEADER.set(int(leading))
        return leading

    def _resign(self) -> None:
        with self._mutex:
            self.lock.release()
            if self._leading:
                log.info("sweeper %s gave up the lead", self.engine.settings.worker_id)
            self._leading = False
            metrics.SWEEPER_LEADER.set(0)


def _scheduler_options() -> dict[str, object]:
    # One thread: the sweeps run one after another. A late run is run, not
    # skipped (a long retention pass delays the others), and runs that piled
    # up behind it collapse into one.
    return {
        "executors": {"default": ThreadPoolExecutor(1)},
        "job_defaults": {"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        "timezone": UTC,
    }
