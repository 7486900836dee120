"""The domain-event log: one stream of every event, read by one group per service.

Two implementations behind one interface, like the doorbells and the command
bus: :class:`RedisEventLog` (``<prefix>:events``, one consumer group per
handler service, so each service sees every event and the processes of one
service share them) and :class:`InProcessEventLog` (the threads of one
process). What an event means is :mod:`engine.choreography`'s business.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import InvalidInput
from engine.transport.redis_streams import RedisStreams
from engine.transport.streams import Entry

if TYPE_CHECKING:
    from engine.settings import Settings

log = logging.getLogger(__name__)


class EventLog(Protocol):
    """An append-only log of events, read through consumer groups."""

    in_process: bool
    #: How often to :meth:`keep` the entries in hand, in seconds; None: never needed.
    keep_every: float | None

    def append(self, fields: Mapping[str, str]) -> None:
        """Append one event's fields; raises :class:`~engine.errors.TransportError`."""

    def read(self, group: str, consumer: str, count: int, timeout: float) -> list[Entry]:
        """Up to ``count`` entries ``group`` has not yet handled, waiting up to ``timeout`` s."""

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        """Mark entries handled by ``group``."""

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        """Set a malformed entry aside and acknowledge it."""

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        """Say that ``consumer`` still works on ``entries`` (see ``CommandBus.keep``)."""

    def close(self) -> None:
        """Release connections."""


class InProcessEventLog:
    """Events shared by the threads of one process; each group reads every event once."""

    in_process = True
    keep_every: float | None = None

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._offsets: dict[str, int] = {}
        self._ready = threading.Condition()
        #: Malformed entries set aside: (group, entry, reason).
        self.poisoned: list[tuple[str, Entry, str]] = []

    def append(self, fields: Mapping[str, str]) -> None:
        raw = {k.encode(): v.encode("utf-8", "surrogatepass") for k, v in fields.items()}
        with self._ready:
            self._entries.append(Entry("events", f"{len(self._entries) + 1}-0", raw))
            self._ready.notify_all()

    def read(self, group: str, consumer: str, count: int, timeout: float) -> list[Entry]:
        with self._ready:
            # A group created now reads from the start, like a Redis group made from id 0.
            start = self._offsets.setdefault(group, 0)
            self._ready.wait_for(lambda: len(self._entries) > start, timeout=max(timeout, 0.0))
            taken = self._entries[start : start + count]
            self._offsets[group] = start + len(taken)
            return taken

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        return None  # read means taken: there is no redelivery in one process

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        self.poisoned.append((group, entry, reason))

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        return None  # nothing is taken over in one process

    def close(self) -> None:
        return None


class RedisEventLog:
    """Events on the Redis stream ``<prefix>:events``, one consumer group per service.

    Each group reads through a client of its own, so that the scans for
    entries a dead process left pending (XAUTOCLAIM) keep one cursor per group.
    """

    in_process = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "saga",
        client_name: str = "events",
        maxlen: int = 100_000,
        claim_idle_seconds: float = 30.0,
        max_deliveries: int = 10,
    ) -> None:
        def make(name: str) -> RedisStreams:
            return RedisStreams(
                url,
                prefix=prefix,
                client_name=f"{client_name}:{name}",
                maxlen=maxlen,
                claim_idle_seconds=claim_idle_seconds,
                max_deliveries=max_deliveries,
            )

        self._make: Callable[[str], RedisStreams] = make
        self._writer = self._make("publish")
        self.stream = f"{self._writer.prefix}:events"
        self.keep_every = self._writer.keep_every
        self._readers: dict[str, RedisStreams] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisEventLog:
        if not settings.redis_url:
            raise InvalidInput("SAGA_REDIS_URL", "is not set; the Redis event bus needs it")
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            client_name=f"events:{settings.worker_id}",
            maxlen=settings.redis_stream_maxlen,
            claim_idle_seconds=settings.redis_claim_idle_seconds,
            max_deliveries=settings.redis_max_deliveries,
        )

    @property
    def client(self) -> Any:
        """The Redis client events are published with, for operators' tools and tests."""
        return self._writer.client

    def append(self, fields: Mapping[str, str]) -> None:
        self._writer.send(self.stream, fields)

    def read(self, group: str, consumer: str, count: int, timeout: float) -> list[Entry]:
        return self._reader(group).read([self.stream], group, consumer, count, timeout)

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        self._reader(group).ack(group, entries)

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        self._reader(group).poison(group, entry, reason)

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        self._reader(group).keep(group, consumer, entries)

    def close(self) -> None:
        self._writer.close()
        for reader in self._readers.values():
            reader.close()

    def _reader(self, group: str) -> RedisStreams:
        with self._lock:
            if group not in self._readers:
                self._readers[group] = self._make(group)
            return self._readers[group]


def event_log_from_settings(settings: Settings) -> EventLog:
    """Redis when ``SAGA_REDIS_URL`` is set, else an in-process log."""
    if settings.redis_url:
        return RedisEventLog.from_settings(settings)
    return InProcessEventLog()
