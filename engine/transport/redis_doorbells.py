"""Doorbells on a Redis stream, read by the workers' consumer group.

Key layout (``prefix`` is ``SAGA_REDIS_PREFIX``, default ``saga``, so two
deployments can share one Redis)::

    <prefix>:work     stream; one entry per doorbell, field ``saga_id``;
                      consumer group ``workers``, one consumer per worker
    <prefix>:poison   stream; entries set aside (malformed, or taken over too
                      often), with their raw fields, the reason and the
                      source stream and entry id

The transport is a thin layer over :class:`~engine.transport.redis_streams.RedisStreams`, which owns
the consumer-group mechanics: a worker acknowledges (XACK) an entry only
after handling it, so a worker that dies leaves its entries pending; live
workers take them over with XAUTOCLAIM once they have been idle for
``claim_idle_seconds``, and set aside one delivered more than
``max_deliveries`` times. Consumers of dead workers are removed from the
group. What is left here is what a doorbell is: a malformed entry is copied
to the poison stream and acknowledged in one MULTI, so it is neither lost
nor delivered again. Redis errors become :class:`~engine.errors.TransportError`;
the connection pool reconnects on the next call. docs/redis.md describes the
operations side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from engine import metrics
from engine.errors import InvalidInput
from engine.transport.doorbells import Delivery
from engine.transport.redis_client import connect
from engine.transport.redis_streams import RedisStreams
from engine.transport.streams import RAW_PREFIX, Entry, PoisonRecord

if TYPE_CHECKING:
    from engine.settings import Settings

__all__ = [
    "FIELD",
    "RAW_PREFIX",
    "PoisonRecord",
    "RedisStreamsTransport",
    "connect",
    "is_saga_id",
]

#: The one field of a doorbell: the id of the saga to look at.
FIELD = b"saga_id"
_SAGA_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


class RedisStreamsTransport:
    """The production transport: a Redis stream and a consumer group."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "saga",
        group: str = "workers",
        consumer: str = "worker",
        maxlen: int = 100_000,
        claim_idle_seconds: float = 30.0,
        max_deliveries: int = 10,
        forget_idle_seconds: float = 3600.0,
    ) -> None:
        """Connect to ``url``; :class:`.redis_streams.RedisStreams` has the options."""
        self._bus = RedisStreams(
            url,
            prefix=prefix,
            # Connections are named <prefix>:<worker id> in CLIENT LIST.
            client_name=consumer,
            maxlen=maxlen,
            claim_idle_seconds=claim_idle_seconds,
            max_deliveries=max_deliveries,
            forget_idle_seconds=forget_idle_seconds,
            unreachable_hint="; workers keep polling the store and reconnect when it is back",
        )
        self.stream = f"{prefix}:work"
        self.poison_stream = self._bus.poison_stream
        self.group = group
        self.consumer = consumer
        self.where = self._bus.where

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStreamsTransport:
        """The transport ``settings`` describe; this worker's id names its consumer."""
        if not settings.redis_url:
            raise InvalidInput("SAGA_REDIS_URL", "is not set; the Redis transport needs it")
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            consumer=settings.worker_id,
            maxlen=settings.redis_stream_maxlen,
            claim_idle_seconds=settings.redis_claim_idle_seconds,
            max_deliveries=settings.redis_max_deliveries,
        )

    @property
    def maxlen(self) -> int:
        """Approximate cap on the work stream's length."""
        return self._bus.maxlen

    @property
    def claim_idle_ms(self) -> int:
        """How long a delivery stays unacknowledged before another worker takes it over."""
        return self._bus.claim_idle_ms

    @property
    def max_deliveries(self) -> int:
        """Deliveries after which a doorbell taken over is set aside as poison."""
        return self._bus.max_deliveries

    # -- the transport interface -------------------------------------------

    def publish(self, saga_id: str) -> None:
        self._bus.send(self.stream, {FIELD.decode(): saga_id})

    def receive(self, max_count: int, timeout: float) -> list[Delivery]:
        entries = self._bus.read([self.stream], self.group, self.consumer, max_count, timeout)
        deliveries = []
        for entry in entries:
            saga_id, problem = _parse(entry.fields)
            if saga_id is not None:
                deliveries.append(Delivery(saga_id, entry.id))
            else:
                metrics.set_aside(self.stream, "malformed")
                self._bus.poison(self.group, entry, problem)
        return deliveries

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        entries = [Entry(self.stream, d.message_id, {}) for d in deliveries if d.message_id]
        self._bus.ack(self.group, entries)

    def close(self) -> None:
        self._bus.close()

    # -- for operators and tests --------------------------------------------

    def poison(self, count: int = 100) -> list[PoisonRecord]:
        """The newest ``count`` poison records, newest first.

        The poison stream is shared with the command, reply and event streams;
        a record's ``source_stream`` says where its entry came from.
        """
        return self._bus.poison_records(count)


def is_saga_id(text: str) -> bool:
    """True when ``text`` has the shape of a saga id (a UUID in its usual text form)."""
    return _SAGA_ID.fullmatch(text) is not None


def _parse(fields: Mapping[bytes, bytes]) -> tuple[str | None, str]:
    """The saga id an entry carries, or None and the reason it carries none."""
    raw = fields.get(FIELD)
    if raw is None:
        names = ", ".join(repr(name) for name in fields) or "none"
        return None, f"no saga_id field (fields: {names})"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"saga_id is not UTF-8 text: {raw[:60]!r}"
    if not is_saga_id(text):
        return None, f"saga_id {text[:60]!r} is not a saga id (a UUID)"
    return text.lower(), ""
