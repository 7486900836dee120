"""Runs the sweeps on their intervals (APScheduler 3), in one sweeper at a time.

Any number of sweeper processes may run (``saga sweeper``, ``saga worker
--sweeper``, the demo); before each sweep, each one tries to become the
leader (:mod:`engine.store.leader`), and only the leader sweeps. The sweeps
run one after another on one scheduler thread, so they never compete with
each other for the store.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.base import BaseScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.blocking import BlockingScheduler  # type: ignore[import-untyped]

from engine import metrics
from engine.collaborators import Collaborators
from engine.errors import TransportError
from engine.store import StoreError
from engine.store.leader import LeaderLock, lock_for
from engine.sweeper.passes import SWEEPS, Counts, Sweeps

log = logging.getLogger(__name__)


class Sweeper:
    """Runs the sweeps on their intervals while this process leads.

    ``start()`` runs them on a background thread (in a worker or the demo);
    ``run_forever(stop)`` blocks the calling thread (``saga sweeper``);
    ``run_once()`` is one full pass, for a test, a benchmark or cron.
    """

    def __init__(self, collaborators: Collaborators, *, lock: LeaderLock | None = None) -> None:
        self.settings = collaborators.settings
        self.owner = collaborators.owner
        self.sweeps = Sweeps(collaborators)
        self.lock = lock or lock_for(collaborators.store)
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
            except (StoreError, TransportError) as exc:
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
        settings = self.settings
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
            owner = self.owner
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
                log.info("sweeper %s gave up the lead", self.owner)
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
