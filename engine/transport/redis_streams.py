"""Redis Streams with consumer groups: the one home of their mechanics.

Key layout on Redis (``prefix`` is ``SAGA_REDIS_PREFIX``)::

    <prefix>:commands:<service>  stream; commands for one participant service;
                                 consumer group ``participants``
    <prefix>:replies             stream; participants' replies;
                                 consumer group ``workers``
    <prefix>:poison              entries set aside: malformed, or taken over too
                                 often (shared with the doorbells and events)

Entries are read with XREADGROUP and acknowledged (XACK) by the reader once
handled, so a reader that dies leaves them pending; live readers of the same
group take them over with XAUTOCLAIM after ``claim_idle_seconds``. An entry
taken over more than ``max_deliveries`` times (every reader that took it died
or hung) is set aside as poison instead of going round for ever, and consumers
of dead processes are removed from their group. :class:`RedisStreams` carries
commands and replies itself; the doorbell transport
(:mod:`engine.transport.redis_doorbells`) and the event log
(:mod:`engine.transport.event_log`) are thin layers over it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis

from engine import metrics
from engine.errors import InvalidInput, TransportError
from engine.model import now_ms
from engine.transport.redis_client import MAX_BLOCK_SECONDS, connect
from engine.transport.streams import RAW_PREFIX, Entry, PoisonRecord

if TYPE_CHECKING:
    from engine.settings import Settings

log = logging.getLogger(__name__)


_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,100}")


_POISON_MAXLEN = 10_000


# Rows an XPENDING page holds beyond the entries just taken over: room for what
# the reader holds besides, so that one round trip nearly always does.
_PENDING_SLACK = 100


class RedisStreams:
    """Commands and replies on Redis streams, read through consumer groups.

    The one home of the consumer-group mechanics on Redis: groups are made on
    first use (and again when Redis lost them), entries left pending by a dead
    reader are taken over, entries taken over too often and malformed entries
    are set aside on the poison stream, consumers of dead processes are
    removed, and Redis errors become :class:`~engine.errors.TransportError`.
    """

    in_process = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "saga",
        client_name: str = "bus",
        maxlen: int = 100_000,
        claim_idle_seconds: float = 30.0,
        max_deliveries: int = 10,
        forget_idle_seconds: float = 3600.0,
        unreachable_hint: str = "",
    ) -> None:
        """Connect to ``url``; nothing is read or written yet.

        ``max_deliveries``: an entry taken over after being delivered this many
        times is set aside as poison. ``forget_idle_seconds``: a consumer that
        holds nothing and has been idle this long is removed from its group.
        ``unreachable_hint`` ends the message of errors raised while Redis is
        unreachable (what the caller does about it).
        """
        if not _PREFIX.fullmatch(prefix):
            raise InvalidInput(
                "SAGA_REDIS_PREFIX", f"{prefix!r}: use 1-100 letters, digits or any of _.:{{}}-"
            )
        if max_deliveries < 1:
            raise InvalidInput(
                "SAGA_REDIS_MAX_DELIVERIES", f"must be 1 or more, got {max_deliveries}"
            )
        self.prefix = prefix
        self.poison_stream = f"{prefix}:poison"
        self.maxlen = maxlen
        self.claim_idle_ms = max(1, int(claim_idle_seconds * 1000))
        # Three times per idle period: a kept entry never looks abandoned, even
        # when one keep comes late.
        self.keep_every: float | None = claim_idle_seconds / 3
        self.max_deliveries = max_deliveries
        self.forget_idle_ms = max(1, int(forget_idle_seconds * 1000))
        self.groups_created: dict[str, int] = {}
        self.groups_made_at: dict[str, int] = {}
        self._claim_every = claim_idle_seconds / 2
        self._forget_every = forget_idle_seconds
        # Per stream; a reader scans at once, for a restarted reader may find a dead one's entries.
        self._next_claim: dict[str, float] = {}
        self._claim_cursor: dict[str, str] = {}
        self._next_forget: dict[str, float] = {}
        self._rotation = 0  # which streams a read of fewer entries than streams starts with
        self._hint = unreachable_hint
        self._lock = threading.Lock()
        self._redis, self.where = connect(url, f"{prefix}:{client_name}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStreams:
        if not settings.redis_url:
            raise InvalidInput("SAGA_REDIS_URL", "is not set; the Redis command bus needs it")
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            client_name=f"bus:{settings.worker_id}",
            maxlen=settings.redis_stream_maxlen,
            claim_idle_seconds=settings.redis_claim_idle_seconds,
            max_deliveries=settings.redis_max_deliveries,
        )

    def commands_stream(self, service: str) -> str:
        return f"{self.prefix}:commands:{service}"

    @property
    def replies_stream(self) -> str:
        return f"{self.prefix}:replies"

    def send(self, stream: str, fields: Mapping[str, str]) -> None:
        with self._translate("send to", stream):
            self._redis.xadd(stream, dict(fields), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]

    def send_many(self, entries: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        self.send_and_ack(entries, "", ())

    def read(
        self, streams: Sequence[str], group: str, consumer: str, count: int, timeout: float
    ) -> list[Entry]:
        if count <= 0 or not streams:
            return []
        with self._translate("read", ", ".join(streams)):
            try:
                return self._next_entries(streams, group, consumer, count, timeout)
            except redis.ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                # First use, or Redis lost the group with its data (UNBLOCKED: the
                # stream was deleted while this client waited on it): make it, read again.
                self._create_groups(streams, group)
                return self._next_entries(streams, group, consumer, count, timeout)

    def ack(self, group: str, entries: Sequence[Entry]) -> None:
        self.send_and_ack((), group, entries)

    def send_and_ack(
        self, entries: Sequence[tuple[str, Mapping[str, str]]], group: str, acks: Sequence[Entry]
    ) -> None:
        if not entries and not acks:
            return
        streams = sorted({stream for stream, _ in entries} | {entry.stream for entry in acks})
        with self._translate("send to" if entries else "acknowledge on", ", ".join(streams)):
            # Not a MULTI: if an XACK is lost its entry is delivered again, and the
            # repeat is harmless (a repeated command meets its idempotency key, a
            # repeated reply finds its attempt recorded and is discarded).
            pipe = self._redis.pipeline(transaction=False)
            for stream, fields in entries:
                pipe.xadd(stream, dict(fields), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            by_stream: dict[str, list[str]] = {}
            for entry in acks:
                by_stream.setdefault(entry.stream, []).append(entry.id)
            for stream, ids in by_stream.items():
                # Without the group (Redis lost it) XACK acknowledges nothing, which is right.
                pipe.xack(stream, group, *ids)
            pipe.execute()

    def poison(self, group: str, entry: Entry, reason: str) -> None:
        log.warning(
            "malformed entry %s on %s: %s; moved to %s",
            entry.id,
            entry.stream,
            reason,
            self.poison_stream,
        )
        with self._translate("set aside a malformed entry from", entry.stream):
            self._set_aside(group, [(entry, reason)])

    def keep(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.id)
        with self._translate("keep entries in hand on", ", ".join(by_stream)):
            # XCLAIM to the holder itself resets the entries' idle time; JUSTID
            # leaves their delivery count alone, so a long handler is neither
            # taken over nor mistaken for a poison pill.
            pipe = self._redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, group, consumer, 0, ids, justid=True)  # type: ignore[arg-type]
            pipe.execute()

    def poison_records(self, count: int = 100) -> list[PoisonRecord]:
        """The newest ``count`` records of the poison stream, newest first."""
        with self._translate("read", self.poison_stream):
            rows: Any = self._redis.xrevrange(self.poison_stream, count=count)
        return [_poison_record(entry_id, fields) for entry_id, fields in rows]

    def close(self) -> None:
        self._redis.close()

    @property
    def client(self) -> redis.Redis:
        """The Redis client, for operators' tools and tests."""
        return self._redis

    # -- reading ------------------------------------------------------------

    def _next_entries(
        self, streams: Sequence[str], group: str, consumer: str, count: int, timeout: float
    ) -> list[Entry]:
        for stream in streams:
            taken = self._claim_abandoned(stream, group, consumer, count)
            if taken:
                return taken
        # COUNT applies to each stream: share it out, so the total stays within count.
        if len(streams) > count:
            self._rotation += 1
            start = self._rotation % len(streams)
            streams = [*streams[start:], *streams[:start]][:count]
        reply: Any = self._redis.xreadgroup(
            group,
            consumer,
            dict.fromkeys(streams, ">"),
            count=max(1, count // len(streams)),
            block=self._block_ms(streams, timeout),
        )
        entries: list[Entry] = []
        for stream, rows in reply or []:
            name = _text(stream)
            entries.extend(Entry(name, _text(i), f) for i, f in rows if f is not None)
        return entries

    def _block_ms(self, streams: Sequence[str], timeout: float) -> int | None:
        wait = min(timeout, MAX_BLOCK_SECONDS)
        now = time.monotonic()
        for stream in streams:  # wake up in time for the next scan of abandoned entries
            wait = min(wait, max(self._next_claim.get(stream, 0.0) - now, 0.001))
        # BLOCK 0 means "forever" to Redis; no BLOCK at all means "do not wait".
        return max(1, int(wait * 1000)) if wait > 0 else None

    def _claim_abandoned(self, stream: str, group: str, consumer: str, count: int) -> list[Entry]:
        """Take over entries other readers of ``group`` left unacknowledged for too long."""
        with self._lock:
            if time.monotonic() < self._next_claim.get(stream, 0.0):
                return []
            reply = self._redis.xautoclaim(
                stream,
                group,
                consumer,
                self.claim_idle_ms,
                start_id=self._claim_cursor.get(stream, "0-0"),
                count=count,
            )
            cursor = _text(reply[0])
            self._claim_cursor[stream] = cursor
            went_round = cursor == "0-0"
            if went_round:  # the scan went round: rest until the next period
                self._next_claim[stream] = time.monotonic() + self._claim_every
        if went_round:
            self._forget_dead_consumers(stream, group, consumer)
        # Redis 7 drops entries trimmed from the stream; older servers return them empty.
        entries = [Entry(stream, _text(i), f) for i, f in reply[1] if i is not None and f]
        if not entries:
            return []
        log.info(
            "%s took over %d entries of %s left unacknowledged for over %.1fs",
            consumer,
            len(entries),
            stream,
            self.claim_idle_ms / 1000,
        )
        return self._within_the_cap(group, consumer, entries)

    def _within_the_cap(self, group: str, consumer: str, entries: list[Entry]) -> list[Entry]:
        """``entries`` just taken over, less those delivered too often, which are set aside."""
        counts = self._delivery_counts(group, consumer, entries)
        over = [(e, counts[e.id]) for e in entries if counts.get(e.id, 0) > self.max_deliveries]
        if not over:
            return entries
        for entry, times in over:
            log.warning(
                "entry %s on %s was delivered %d times to group %s and never acknowledged "
                "(the cap is %d); moved to %s",
                entry.id,
                entry.stream,
                times,
                group,
                self.max_deliveries,
                self.poison_stream,
            )
        self._set_aside(group, [(entry, _over_the_cap(times)) for entry, times in over])
        for entry, _ in over:
            metrics.set_aside(entry.stream, "redelivered")
        return [e for e in entries if counts.get(e.id, 0) <= self.max_deliveries]

    def _delivery_counts(self, group: str, consumer: str, entries: list[Entry]) -> dict[str, int]:
        """How many times each of ``entries``, just taken over by ``consumer``, was delivered."""
        stream = entries[0].stream
        wanted = {e.id for e in entries}
        low, high = min(wanted, key=_id_order), max(wanted, key=_id_order)
        page = len(wanted) + _PENDING_SLACK
        counts: dict[str, int] = {}
        try:
            while True:
                rows: Any = self._redis.xpending_range(
                    stream, group, low, high, page, consumername=consumer
                )
                for row in rows:
                    if (entry_id := _text(row["message_id"])) in wanted:
                        counts[entry_id] = int(row["times_delivered"])
                if len(rows) < page or len(counts) == len(wanted):
                    return counts
                low = f"({_text(rows[-1]['message_id'])}"  # the next page, after the last row
        except redis.ResponseError as exc:
            # Refused (an ACL without XPENDING, say): the entries are still worth
            # handling, so deliver them unchecked. An outage is raised, like any read's.
            log.warning(
                "could not count how often %d entries of %s were delivered, so the cap of "
                "%d deliveries is not applied to them: %s",
                len(entries),
                stream,
                self.max_deliveries,
                exc,
            )
            return {}

    def _forget_dead_consumers(self, stream: str, group: str, consumer: str) -> None:
        """Remove consumers of ``group`` that hold nothing and have long been idle.

        Runs when a scan for abandoned entries went round, at most once per
        ``forget_idle_seconds`` for each stream. Never removes ``consumer``.
        """
        now = time.monotonic()
        with self._lock:
            if now < self._next_forget.get(stream, 0.0):
                return
            self._next_forget[stream] = now + self._forget_every
        try:
            consumers: Any = self._redis.xinfo_consumers(stream, group)
            for info in consumers:
                if _text(info["name"]) != consumer:
                    self._forget_if_dead(stream, group, info)
        except redis.RedisError as exc:
            # Safe to skip: a consumer left behind holds nothing and only lengthens
            # XINFO CONSUMERS; the next round tries again. Reading goes on.
            log.warning("could not remove dead consumers of %s on %s: %s", group, stream, exc)

    def _forget_if_dead(self, stream: str, group: str, info: Mapping[str, Any]) -> None:
        # "idle" is the time since the consumer's last attempt to read or claim
        # on Redis 7.2 and later, so a live reader's stays below its polling period
        # (2 s at most). Before 7.2 it counts from the last read that got entries
        # ("inactive" since 7.2): a live reader left without work that long is then
        # removed too, which is harmless, as it holds nothing and Redis adds it back
        # when it next gets an entry.
        name, idle_ms = _text(info["name"]), int(info["idle"])
        if int(info["pending"]) > 0 or idle_ms <= self.forget_idle_ms:
            return
        dropped = self._redis.xgroup_delconsumer(stream, group, name)
        log.info(
            "removed consumer %s from group %s on %s: nothing pending, idle for %.0fs",
            name,
            group,
            stream,
            idle_ms / 1000,
        )
        if dropped:
            # It read entries between XINFO and the removal, so it was alive after all.
            log.warning(
                "consumer %s of group %s on %s got %d entries while it was being removed; "
                "they are no longer pending and will not be delivered again",
                name,
                group,
                stream,
                dropped,
            )

    def _create_groups(self, streams: Sequence[str], group: str) -> None:
        for stream in streams:
            try:
                # From id 0: entries written before the group existed are still to be read.
                self._redis.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise
                continue
            self.groups_created[stream] = self.groups_created.get(stream, 0) + 1
            self.groups_made_at[stream] = now_ms()
            self._claim_cursor[stream] = "0-0"
            log.info("created consumer group %s on %s", group, stream)

    # -- setting entries aside ---------------------------------------------------

    def _set_aside(self, group: str, items: Sequence[tuple[Entry, str]]) -> None:
        """Copy each entry to the poison stream with its reason, and acknowledge it."""
        # Records and acknowledgements in one MULTI: never lost, never delivered again.
        pipe = self._redis.pipeline(transaction=True)
        for entry, reason in items:
            record = _poison_fields(entry, reason)
            pipe.xadd(self.poison_stream, record, maxlen=_POISON_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.xack(entry.stream, group, entry.id)
        pipe.execute()

    @contextmanager
    def _translate(self, operation: str, where: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransportError(
                f"could not {operation} {where}: Redis at {self.where} is unreachable "
                f"({exc}){self._hint}"
            ) from exc
        except redis.RedisError as exc:
            raise TransportError(
                f"Redis at {self.where} refused to {operation} {where}: {exc}"
            ) from exc


def _over_the_cap(times: int) -> str:
    return (
        f"delivered {times} times and never acknowledged "
        "(every reader that took it died or hung); set aside"
    )


def _poison_fields(entry: Entry, reason: str) -> dict[bytes, bytes | str | int]:
    record: dict[bytes, bytes | str | int] = {
        b"reason": reason,
        b"source_id": entry.id,
        b"source_stream": entry.stream,
        b"at": now_ms(),
    }
    record.update({RAW_PREFIX + name: value for name, value in entry.fields.items()})
    return record


def _poison_record(entry_id: bytes, fields: Mapping[bytes, bytes]) -> PoisonRecord:
    # Anyone who can write to Redis can write here too: read every field leniently,
    # so that one odd record never hides the others from an operator.
    raw = {k[len(RAW_PREFIX) :]: v for k, v in fields.items() if k.startswith(RAW_PREFIX)}

    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    at = text(b"at")
    return PoisonRecord(
        id=_text(entry_id),
        source_id=text(b"source_id"),
        reason=text(b"reason"),
        at=int(at) if at.isascii() and at.isdigit() else 0,
        fields=raw,
        source_stream=text(b"source_stream"),
    )


def _id_order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _text(value: bytes | str | Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
