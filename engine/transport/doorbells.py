"""Transports carry doorbells: "look at saga X". The store holds the truth.

Every transport has the same small interface, so the worker does not know
which one it has. The in-process queue serves the embedded default; the
Redis Streams transport (:mod:`engine.transport.redis_doorbells`) serves production.

What every transport promises:

- ``publish`` hands the id on, or raises :class:`~engine.errors.TransportError`;
- ``receive`` returns at most ``max_count`` deliveries, waits about
  ``timeout`` seconds at most, and returns ``[]`` when nothing came;
- each published id is delivered at least once while the transport keeps
  its messages; the worker calls ``ack`` once it has handled a delivery.

What no transport promises: order, deduplication (publish twice, receive
twice), or keeping messages through a loss of its own state. The in-process
queue never redelivers: a delivery is gone once received, and ``ack`` does
nothing (its messages die with the process anyway). Redis redelivers a
delivery nobody acknowledged to another consumer after an idle threshold.
A lost or repeated message is harmless: the store's leases make a repeat a
no-op, and the workers' poll of the store (and the sweeps) make a loss a
delay.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.errors import TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One doorbell handed to a worker: look at ``saga_id``, then acknowledge it."""

    saga_id: str
    #: The transport's handle for :meth:`Transport.ack`; empty when it has none.
    message_id: str = ""


class Transport(Protocol):
    """Where ``publish`` rings, ``receive`` listens, and ``ack`` says "handled"."""

    def publish(self, saga_id: str) -> None:
        """Ring the bell for ``saga_id``; call only after its transaction committed."""

    def receive(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries, waiting at most ``timeout`` seconds for the first.

        Call from one thread per transport object.
        """

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Mark ``deliveries`` handled (claimed and advanced, or nothing to do)."""

    def close(self) -> None:
        """Release connections."""


def ring(transport: Transport, saga_id: str) -> bool:
    """Publish after a commit; a transport outage is logged, not raised.

    The work is already due in the store, so the workers' poll finds it
    without the doorbell. Raising here would tell a caller whose transaction
    committed that it failed, and invite a duplicate.
    """
    try:
        transport.publish(saga_id)
    except TransportError as exc:
        log.warning("saga %s: no doorbell (%s); a worker's store poll will find it", saga_id, exc)
        return False
    return True


class InProcessQueue:
    """A queue shared by the threads of one process: the embedded default."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()

    def publish(self, saga_id: str) -> None:
        self._queue.put(saga_id)

    def receive(self, max_count: int, timeout: float) -> list[Delivery]:
        if max_count <= 0:
            return []
        try:
            ids = [self._queue.get(timeout=max(timeout, 0.0))]
        except queue.Empty:
            return []
        while len(ids) < max_count:
            try:
                ids.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [Delivery(saga_id) for saga_id in ids]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        # Nothing to do: a delivery left the queue when it was received.
        return None

    def close(self) -> None:
        return None
