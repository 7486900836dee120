"""The command bus: streams that carry commands to participants and replies back.

Two implementations behind one small interface, like the doorbell
transports: :class:`~engine.transport.redis_streams.RedisStreams` (Redis Streams
with consumer groups, for participants in other processes and hosts) and
:class:`InProcessBus` (queues shared by the threads of one process, the
embedded default). What an entry means is :mod:`engine.remote`'s business;
this module moves fields.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from engine.transport.redis_streams import RedisStreams
from engine.transport.streams import Entry

if TYPE_CHECKING:
    from engine.settings import Settings

log = logging.getLogger(__name__)


#: Consumer group of the participants on each command stream.
PARTICIPANTS = "participants"


#: Consumer group of the workers on the reply stream.
WORKERS = "workers"


class CommandBus(Protocol):
    """Streams of commands and replies, read through consumer groups."""

    #: True for the in-process bus: its readers must run in this process.
    in_process: bool
    #: How many times a reader had to create a consumer group, by stream: the first
    #: use, or Redis lost its data (a flush, a restart without persistence).
    groups_created: dict[str, int]
    #: When a reader last created each stream's group (epoch ms).
    groups_made_at: dict[str, int]
    #: How often a reader should :meth:`keep` the entries it still works on, in seconds;
    #: None when nothing is ever taken over (the in-process bus).
    keep_every: float | None

    def commands_stream(self, service: str) -> str:
        """The stream that carries commands for ``service``."""

    @property
    def replies_stream(self) -> str:
        """The stream that carries replies to the workers."""

    def send(self, stream: str, fields: Mapping[str, str]) -> None:
        """Append one entry; raises :class:`~engine.errors.TransportError`."""

    def send_many(self, entries: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        """Append several (stream, fields) entries at once, in one round trip where it can."""

    def read(
        self, streams: Sequence[str], group: str, consumer: str, count: int, timeout: float
    ) -> list[Entry]:
        """Up to ``count`` entries for ``consumer`` of ``group``, waiting up to ``timeout`` s."""

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        """Mark ``entries`` handled, so they are not delivered again."""

    def send_and_ack(
        self, entries: Sequence[tuple[str, Mapping[str, str]]], group: str, acks: Sequence[Entry]
    ) -> None:
        """Append ``entries``, then acknowledge ``acks``, in one round trip where it can."""

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        """Set a malformed entry aside with ``reason``, and acknowledge it."""

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        """Say that ``consumer`` still works on ``entries``, so that no other reader takes
        them over as abandoned; call it every :attr:`keep_every` seconds."""

    def close(self) -> None:
        """Release connections."""


def read_wait(bus: CommandBus) -> float:
    """How long a reader waits for entries before it looks whether it should stop.

    Short, so that a stopping worker or participant drains promptly; an idle
    Redis reader then costs a few blocking reads a second.
    """
    return 0.1 if bus.in_process else 0.5


def bus_from_settings(settings: Settings) -> CommandBus:
    """Redis when ``SAGA_REDIS_URL`` is set, else the in-process bus."""
    if settings.redis_url:
        return RedisStreams.from_settings(settings)
    return InProcessBus()


class InProcessBus:
    """Queues shared by the threads of one process; nothing survives the process.

    There is no redelivery: an entry leaves its queue when read. A lost entry
    costs what it costs on Redis after a flush: the attempt times out at its
    deadline and is tried again.
    """

    in_process = True
    keep_every: float | None = None

    def __init__(self) -> None:
        self.groups_created: dict[str, int] = {}
        self.groups_made_at: dict[str, int] = {}
        self._queues: dict[str, deque[Entry]] = {}
        self._ready = threading.Condition()
        self._next_id = 0
        #: Malformed entries set aside, newest last: (entry, reason).
        self.poisoned: list[tuple[Entry, str]] = []

    def commands_stream(self, service: str) -> str:
        return f"commands:{service}"

    @property
    def replies_stream(self) -> str:
        return "replies"

    def send(self, stream: str, fields: Mapping[str, str]) -> None:
        raw = {k.encode(): v.encode("utf-8", "surrogatepass") for k, v in fields.items()}
        with self._ready:
            self._next_id += 1
            entry = Entry(stream, f"{self._next_id}-0", raw)
            self._queues.setdefault(stream, deque()).append(entry)
            self._ready.notify_all()

    def send_many(self, entries: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        for stream, fields in entries:
            self.send(stream, fields)

    def read(
        self, streams: Sequence[str], group: str, consumer: str, count: int, timeout: float
    ) -> list[Entry]:
        if count <= 0:
            return []
        with self._ready:
            self._ready.wait_for(lambda: self._waiting(streams), timeout=max(timeout, 0.0))
            found: list[Entry] = []
            for stream in streams:
                queue = self._queues.get(stream)
                while queue and len(found) < count:
                    found.append(queue.popleft())
            return found

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        return None  # an entry left its queue when it was read

    def send_and_ack(
        self, entries: Sequence[tuple[str, Mapping[str, str]]], group: str, acks: Sequence[Entry]
    ) -> None:
        self.send_many(entries)

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        log.warning("malformed entry %s on %s: %s; dropped", entry.id, entry.stream, reason)
        self.poisoned.append((entry, reason))

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        return None  # nothing is taken over here

    def close(self) -> None:
        return None

    def _waiting(self, streams: Sequence[str]) -> bool:
        return any(self._queues.get(s) for s in streams)
