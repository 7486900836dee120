"""Doorbells on a Redis stream, read by the workers' consumer group.

Key layout (``prefix`` is ``SAGA_REDIS_PREFIX``, default ``saga``, so two
deployments can share one Redis)::

    <prefix>:work     stream; one entry per doorbell, field ``saga_id``;
                      consumer group ``workers``, one consumer per worker
    <prefix>:poison   stream; malformed entries taken off the work stream,
                      with their raw fields, the reason and the source entry id

A worker acknowledges (XACK) an entry only after handling it, so a worker
that dies leaves its entries pending; live workers take them over with
XAUTOCLAIM once they have been idle for ``claim_idle_seconds``. A malformed
entry is copied to the poison stream and acknowledged in one MULTI, so it
is neither lost nor delivered again. Redis errors become
:class:`~engine.errors.TransportError`; the connection pool reconnects on
the next call. docs/redis.md describes the operations side.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine import metrics
from engine.errors import InvalidInput, TransportError
from engine.model import now_ms
from engine.transport import Delivery

if TYPE_CHECKING:
    from engine.settings import Settings

log = logging.getLogger(__name__)

FIELD = b"saga_id"
RAW_PREFIX = b"raw:"
_SAGA_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,100}")
# A blocking read must end well before the socket timeout, or redis-py
# reports a timeout for what is only a quiet stream.
_SOCKET_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 2.0
_MAX_BLOCK_SECONDS = 2.0
_POISON_MAXLEN = 10_000


@dataclass(frozen=True)
class PoisonRecord:
    """A malformed entry that was taken off the work stream."""

    #: Id of this record on the poison stream.
    id: str
    #: Id the entry had on the work stream.
    source_id: str
    reason: str
    #: When it was moved, epoch milliseconds.
    at: int
    #: The entry's fields exactly as they were, bytes for bytes.
    fields: dict[bytes, bytes]


def connect(url: str, client_name: str) -> tuple[redis.Redis, str]:
    """A Redis client set up the way every engine stream reader needs, and where it points."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        # One quick retry replaces a pooled connection Redis closed; more
        # would stall a worker loop while Redis is down.
        retry=Retry(NoBackoff(), 1),
        # Answers in RESP2's shapes, whatever the URL asks for.
        protocol=2,
        # Names the process in CLIENT LIST; Redis allows no spaces there.
        client_name=re.sub(r"[^\w.:@-]", "_", client_name)[:200],
    )
    kwargs = client.connection_pool.connection_kwargs
    where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    return client, where


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
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise InvalidInput(
                "SAGA_REDIS_PREFIX", f"{prefix!r}: use 1-100 letters, digits or any of _.:{{}}-"
            )
        self.stream = f"{prefix}:work"
        self.poison_stream = f"{prefix}:poison"
        self.group = group
        self.consumer = consumer
        self.maxlen = maxlen
        self.claim_idle_ms = max(1, int(claim_idle_seconds * 1000))
        self._claim_every = claim_idle_seconds / 2
        self._next_claim = 0.0  # scan at once: a restarted worker may find a dead one's entries
        self._claim_cursor = "0-0"
        self._lock = threading.Lock()
        self._redis, self.where = connect(url, f"{prefix}:{consumer}")

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
        )

    # -- the transport interface -------------------------------------------

    def publish(self, saga_id: str) -> None:
        with self._translate("publish"):
            self._redis.xadd(self.stream, {FIELD: saga_id}, maxlen=self.maxlen, approximate=True)

    def receive(self, max_count: int, timeout: float) -> list[Delivery]:
        if max_count <= 0:
            return []
        with self._translate("receive"):
            try:
                entries = self._next_entries(max_count, timeout)
            except redis.ResponseError as exc:
                if not _missing_group(exc):
                    raise
                # First use, or Redis lost the group (FLUSHALL, a restart
                # without persistence): make it, then read.
                self._create_group()
                entries = self._next_entries(max_count, timeout)
            return self._deliveries(entries)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        ids = [d.message_id for d in deliveries if d.message_id]
        if not ids:
            return
        with self._translate("acknowledge"):
            # Without the group (Redis lost it) XACK acknowledges nothing, which is right.
            self._redis.xack(self.stream, self.group, *ids)

    def close(self) -> None:
        self._redis.close()

    # -- for operators and tests --------------------------------------------

    def poison(self, count: int = 100) -> list[PoisonRecord]:
        """The newest ``count`` poison records, newest first."""
        with self._translate("read the poison stream"):
            rows: Any = self._redis.xrevrange(self.poison_stream, count=count)
        return [_poison_record(entry_id, fields) for entry_id, fields in rows]

    # -- reading --------------------------------------------------------------

    def _next_entries(self, max_count: int, timeout: float) -> list[Any]:
        return self._claim_abandoned(max_count) or self._read(max_count, timeout)

    def _read(self, max_count: int, timeout: float) -> list[Any]:
        reply = self._redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=max_count,
            block=self._block_ms(timeout),
        )
        return _stream_entries(reply)

    def _block_ms(self, timeout: float) -> int | None:
        wait = min(timeout, _MAX_BLOCK_SECONDS)
        until_claim = self._next_claim - time.monotonic()
        if until_claim > 0:  # wake up in time for the next scan of abandoned entries
            wait = min(wait, until_claim)
        # BLOCK 0 means "forever" to Redis; no BLOCK at all means "do not wait".
        return max(1, int(wait * 1000)) if wait > 0 else None

    def _claim_abandoned(self, max_count: int) -> list[Any]:
        """Take over entries other consumers left unacknowledged for too long."""
        with self._lock:
            if time.monotonic() < self._next_claim:
                return []
            reply = self._redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                start_id=self._claim_cursor,
                count=max_count,
            )
            self._claim_cursor = _text(reply[0])
            if self._claim_cursor == "0-0":  # the scan went round: rest until the next period
                self._next_claim = time.monotonic() + self._claim_every
        # Redis 7 drops entries trimmed from the stream; older servers return them empty.
        entries = [e for e in reply[1] if e[0] is not None and e[1] is not None]
        if entries:
            log.info(
                "%s took over %d doorbells left unacknowledged for over %.1fs",
                self.consumer,
                len(entries),
                self.claim_idle_ms / 1000,
            )
        return entries

    def _create_group(self) -> None:
        try:
            # From id 0, not $: doorbells published before the group existed
            # (or since Redis lost it) are still to be read.
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
            return
        log.info("created consumer group %s on %s", self.group, self.stream)

    # -- checking entries ----------------------------------------------------

    def _deliveries(self, entries: list[Any]) -> list[Delivery]:
        deliveries = []
        for entry_id, fields in entries:
            message_id = _text(entry_id)
            saga_id, problem = _parse(fields)
            if saga_id is not None:
                deliveries.append(Delivery(saga_id, message_id))
            else:
                self._move_to_poison(message_id, fields, problem)
        return deliveries

    def _move_to_poison(self, message_id: str, fields: Mapping[bytes, bytes], reason: str) -> None:
        log.warning(
            "malformed entry %s on %s: %s; moved to %s",
            message_id,
            self.stream,
            reason,
            self.poison_stream,
        )
        metrics.malformed_entry(self.stream)
        record: dict[bytes, bytes | str | int] = {
            b"reason": reason,
            b"source_id": message_id,
            b"at": now_ms(),
        }
        record.update({RAW_PREFIX + name: value for name, value in fields.items()})
        # Record and acknowledgement in one MULTI: never lost, never delivered again.
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(self.poison_stream, record, maxlen=_POISON_MAXLEN, approximate=True)  # type: ignore[arg-type]
        pipe.xack(self.stream, self.group, message_id)
        pipe.execute()

    @contextmanager
    def _translate(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransportError(
                f"could not {operation}: Redis at {self.where} is unreachable ({exc}); "
                "workers keep polling the store and reconnect when it is back"
            ) from exc
        except redis.RedisError as exc:
            raise TransportError(
                f"Redis at {self.where} refused to {operation} on {self.stream}: {exc}"
            ) from exc


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


def _missing_group(exc: redis.ResponseError) -> bool:
    # UNBLOCKED: the stream was deleted while this client waited on it.
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def _stream_entries(reply: Any) -> list[Any]:
    # RESP2 answers [[stream, [(id, fields), ...]]] for the one stream read.
    return list(reply[0][1]) if reply else []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _poison_record(entry_id: bytes, fields: Mapping[bytes, bytes]) -> PoisonRecord:
    raw = {k[len(RAW_PREFIX) :]: v for k, v in fields.items() if k.startswith(RAW_PREFIX)}
    return PoisonRecord(
        id=_text(entry_id),
        source_id=_text(fields.get(b"source_id", b"")),
        reason=fields.get(b"reason", b"").decode("utf-8", "replace"),
        at=int(fields.get(b"at", b"0")),
        fields=raw,
    )
