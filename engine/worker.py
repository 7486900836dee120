"""The worker: listens for doorbells, polls the store for due work, advances instances.

It claims an instance's lease before touching it, so any number of workers
on one store never run the same step at once. ``stop()`` drains: no new
claims, the instances in hand finish their current step and release their
leases, then :meth:`run` returns.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from engine.errors import SagaNotFound

if TYPE_CHECKING:
    from engine.app import SagaEngine

log = logging.getLogger(__name__)


class Worker:
    """Advances up to ``concurrency`` instances at a time."""

    def __init__(self, engine: SagaEngine, concurrency: int) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="saga-worker")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.advanced = 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> Worker:
        """Run in a background thread of this process."""
        self._thread = threading.Thread(target=self.run, name="saga-worker-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Drain and stop; True when every instance in hand was finished in time."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        """Work until :meth:`stop` is called, then drain."""
        settings = self.engine.settings
        log.info(
            "worker %s started: concurrency %d, polling every %.2fs",
            self.engine.owner,
            self.concurrency,
            settings.poll_seconds,
        )
        next_poll = 0.0
        while not self._stopping.is_set():
            free = self._free_slots()
            if free == 0:
                time.sleep(0.005)
                continue
            wait = max(0.0, min(settings.poll_seconds, next_poll - time.monotonic()))
            for saga_id in self.engine.transport.receive(free, wait):
                self._claim_and_submit(saga_id)
            if time.monotonic() >= next_poll:
                self._poll_due()
                next_poll = time.monotonic() + settings.poll_seconds
        self._drain()

    def _poll_due(self) -> None:
        free = self._free_slots()
        if free == 0:
            return
        store, eng = self.engine.store, self.engine
        for saga_id in store.claim_due(eng.owner, eng.lease_ms, eng.clock(), free):
            self._submit(saga_id)

    def _claim_and_submit(self, saga_id: str) -> None:
        eng = self.engine
        if eng.store.claim(saga_id, eng.owner, eng.lease_ms, eng.clock()) is not None:
            self._submit(saga_id)

    def _submit(self, saga_id: str) -> None:
        self._slots.acquire()
        self._pool.submit(self._advance, saga_id)

    def _advance(self, saga_id: str) -> None:
        try:
            inst = self.engine.store.load(saga_id)
            self.engine.executor.advance(inst)
            self.advanced += 1
        except SagaNotFound:
            log.warning("saga %s vanished while leased (purged?)", saga_id)
        except Exception:
            # The lease expires and another pass retries; nothing was half-stored
            # because every store write is one transaction.
            log.exception("saga %s: advancing failed; it will be picked up again", saga_id)
        finally:
            self._slots.release()

    def _free_slots(self) -> int:
        # BoundedSemaphore has no public counter; probe it without blocking.
        taken = 0
        while taken < self.concurrency and self._slots.acquire(blocking=False):
            taken += 1
        for _ in range(taken):
            self._slots.release()
        return taken

    def _drain(self) -> None:
        log.info("worker %s draining", self.engine.owner)
        self._pool.shutdown(wait=True)
        log.info("worker %s stopped", self.engine.owner)
