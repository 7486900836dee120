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

from engine import metrics
from engine.collaborators import Collaborators
from engine.errors import SagaNotFound, TransportError
from engine.executor import Executor
from engine.remote.replies import ReplyListener
from engine.store import StoreError
from engine.sweeper.doorbells import recover
from engine.transport.doorbells import Delivery

log = logging.getLogger(__name__)


class Worker:
    """Advances up to ``concurrency`` instances at a time."""

    def __init__(self, collaborators: Collaborators, executor: Executor, concurrency: int) -> None:
        self.collaborators = collaborators
        self.executor = executor
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="saga-worker")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._transport_down = False
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
        # Each instance in hand stops after its current step, recorded.
        self.executor.draining.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        """Work until :meth:`stop` is called, then drain."""
        settings = self.collaborators.settings
        log.info(
            "worker %s started: concurrency %d, polling every %.2fs",
            self.collaborators.owner,
            self.concurrency,
            settings.poll_seconds,
        )
        if not self._stopping.is_set():
            self.executor.draining.clear()  # a worker started again runs whole sagas
        self._recover()
        replies = self._listen()
        next_poll = 0.0
        while not self._stopping.is_set():
            free = self._free_slots()
            if free == 0:
                time.sleep(0.005)
                continue
            wait = max(0.0, min(settings.poll_seconds, next_poll - time.monotonic()))
            try:
                for delivery in self._receive(free, wait):
                    self._claim_and_submit(delivery)
                if time.monotonic() >= next_poll and not self._stopping.is_set():
                    self._poll_due()
                    next_poll = time.monotonic() + settings.poll_seconds
            except StoreError as exc:
                # The store is unreachable or dropped our connection (the pool
                # replaces it). Nothing was half-written: every write is one
                # transaction. Back off, then claim again from the store.
                log.warning(
                    "worker %s: store error, retrying in %.1fs: %s",
                    self.collaborators.owner,
                    settings.poll_seconds,
                    exc,
                )
                self._stopping.wait(settings.poll_seconds)
        if replies is not None:
            replies.stop()  # the reply in hand is recorded first
        self._drain()

    def _poll_due(self) -> None:
        free = self._free_slots()
        if free == 0:
            return
        c = self.collaborators
        known = [(saga.name, saga.version) for saga in c.registry]
        for saga_id in c.store.claim_due(c.owner, c.lease_ms, c.clock(), free, known):
            self._submit(saga_id)

    def _recover(self) -> None:
        try:
            recover(self.collaborators)
        except TransportError as exc:
            log.warning("worker %s: start-up recovery stopped: %s", self.collaborators.owner, exc)

    def _receive(self, free: int, wait: float) -> list[Delivery]:
        try:
            deliveries = self.collaborators.transport.receive(free, wait)
        except TransportError as exc:
            if not self._transport_down:
                log.warning("worker %s: %s", self.collaborators.owner, exc)
            self._transport_down = True
            self._stopping.wait(wait)  # the store poll keeps work moving meanwhile
            return []
        if self._transport_down:
            log.info("worker %s: the transport is reachable again", self.collaborators.owner)
            self._transport_down = False
        return deliveries

    def _claim_and_submit(self, delivery: Delivery) -> None:
        c, saga_id = self.collaborators, delivery.saga_id
        if self._stopping.is_set():
            return  # draining: no new work; unacknowledged, it goes to another worker
        if c.store.claim(saga_id, c.owner, c.lease_ms, c.clock()) is not None:
            self._submit(saga_id, delivery)
        else:  # finished, unknown, or leased (by us or another worker): nothing to do
            self._ack(delivery)

    def _ack(self, delivery: Delivery) -> None:
        try:
            self.collaborators.transport.ack([delivery])
        except TransportError as exc:
            # It stays pending; a live worker takes it over later and finds nothing to do.
            log.warning("saga %s: could not acknowledge its doorbell: %s", delivery.saga_id, exc)

    def _submit(self, saga_id: str, delivery: Delivery | None = None) -> None:
        self._slots.acquire()
        self._pool.submit(self._advance, saga_id, delivery)

    def _advance(self, saga_id: str, delivery: Delivery | None = None) -> None:
        try:
            inst = self.collaborators.store.load(saga_id)
            self.executor.advance(inst)
            self.advanced += 1
        except SagaNotFound:
            log.warning("saga %s vanished while leased (purged?)", saga_id)
        except Exception:
            # The lease expires and another pass retries; nothing was half-stored
            # because every store write is one transaction.
            metrics.WORKER_ERRORS.inc()
            log.exception("saga %s: advancing failed; it will be picked up again", saga_id)
        finally:
            self._slots.release()
            if delivery is not None:
                self._ack(delivery)

    def _free_slots(self) -> int:
        # BoundedSemaphore has no public counter; probe it without blocking.
        taken = 0
        while taken < self.concurrency and self._slots.acquire(blocking=False):
            taken += 1
        for _ in range(taken):
            self._slots.release()
        return taken

    def _listen(self) -> ReplyListener | None:
        """Read participants' replies in a thread, when some saga has remote steps."""
        if not any(step.remote for saga in self.collaborators.registry for step in saga.steps):
            return None
        return ReplyListener(self.collaborators).start()

    def _drain(self) -> None:
        log.info("worker %s draining", self.collaborators.owner)
        self._pool.shutdown(wait=True)
        log.info("worker %s stopped", self.collaborators.owner)
