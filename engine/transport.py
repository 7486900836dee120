"""Transports carry doorbells: "look at saga X". The store holds the truth.

Every transport has the same small interface, so the worker does not know
which one it has. The in-process queue serves the embedded default; the
Redis Streams transport serves production. A transport may lose or repeat a
message: the store's leases make a repeat harmless, and the workers' poll of
the store (and the sweeps) make a loss harmless.
"""

from __future__ import annotations

import queue
from typing import Protocol


class Transport(Protocol):
    """Where ``publish`` rings and ``receive`` listens."""

    def publish(self, saga_id: str) -> None:
        """Ring the bell for ``saga_id``; call only after its transaction committed."""

    def receive(self, max_count: int, timeout: float) -> list[str]:
        """Up to ``max_count`` saga ids, waiting at most ``timeout`` seconds for the first."""

    def close(self) -> None:
        """Release connections."""


class InProcessQueue:
    """A queue shared by the threads of one process: the embedded default."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()

    def publish(self, saga_id: str) -> None:
        self._queue.put(saga_id)

    def receive(self, max_count: int, timeout: float) -> list[str]:
        try:
            ids = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(ids) < max_count:
            try:
                ids.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return ids

    def close(self) -> None:
        return None
