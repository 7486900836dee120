"""The transport contract, run on the in-process queue and on Redis Streams.

One base class states what every transport promises (see
:mod:`engine.transport`); each subclass builds its transport. Where the two
differ by design (redelivery of what nobody acknowledged), the base test
asks the subclass which promise it makes and checks that one. Redis-only
behaviour (key layout, poison entries, outages) follows the suite.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from engine.errors import TransportError
from engine.model import new_id
from engine.transport.doorbells import Delivery, InProcessQueue, Transport
from engine.transport.redis_doorbells import RedisStreamsTransport

Make = Callable[..., Transport]
MakeRedis = Callable[..., RedisStreamsTransport]


def receive_until(transport: Transport, count: int, timeout: float = 10.0) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived; fail after ``timeout`` seconds."""
    got: list[Delivery] = []
    give_up = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < give_up, f"received {len(got)} of {count}"
        got += transport.receive(count - len(got), 0.2)
    return got


def ids(deliveries: list[Delivery]) -> list[str]:
    return sorted(d.saga_id for d in deliveries)


class TransportContract:
    """What every transport promises. Subclasses provide ``make(consumer=...)``."""

    #: Whether a delivery nobody acknowledged reaches another receiver later.
    redelivers: bool

    @pytest.fixture
    def make(self) -> Iterator[Make]:
        raise NotImplementedError

    def test_what_is_published_is_received(self, make: Make) -> None:
        transport = make()
        sent = [new_id() for _ in range(5)]
        for saga_id in sent:
            transport.publish(saga_id)
        got = receive_until(transport, 5)
        assert ids(got) == sorted(sent)
        transport.ack(got)

    def test_receive_returns_at_most_max_count(self, make: Make) -> None:
        transport = make()
        for _ in range(7):
            transport.publish(new_id())
        first = transport.receive(3, 1.0)
        assert 1 <= len(first) <= 3
        rest = receive_until(transport, 7 - len(first))
        assert len({d.saga_id for d in first + rest}) == 7
        transport.ack(first + rest)

    def test_receive_waits_then_returns_nothing(self, make: Make) -> None:
        transport = make()
        assert transport.receive(10, 0.1) == []
        assert transport.receive(10, 0) == []

    def test_zero_max_count_receives_nothing(self, make: Make) -> None:
        transport = make()
        transport.publish(new_id())
        assert transport.receive(0, 0.1) == []
        transport.ack(receive_until(transport, 1))

    def test_a_repeated_publish_is_delivered_again(self, make: Make) -> None:
        # No deduplication is promised: the store's leases make repeats harmless.
        transport = make()
        saga_id = new_id()
        transport.publish(saga_id)
        transport.publish(saga_id)
        got = receive_until(transport, 2)
        assert ids(got) == [saga_id, saga_id]
        transport.ack(got)

    def test_an_acknowledged_delivery_does_not_come_back(self, make: Make) -> None:
        transport = make()
        transport.publish(new_id())
        transport.ack(receive_until(transport, 1))
        assert transport.receive(10, 0.2) == []
        transport.ack([])

    def test_receivers_share_the_work(self, make: Make) -> None:
        first, second = make(consumer="first"), make(consumer="second")
        sent = [new_id() for _ in range(10)]
        for saga_id in sent:
            first.publish(saga_id)
        got_first = first.receive(4, 1.0)
        got_second = receive_until(second, 10 - len(got_first))
        assert ids(got_first + got_second) == sorted(sent)
        first.ack(got_first)
        second.ack(got_second)

    def test_unacknowledged_delivery_and_another_receiver(self, make: Make) -> None:
        dying = make(consumer="dying")
        survivor = make(consumer="survivor", claim_idle_seconds=0.3)
        saga_id = new_id()
        dying.publish(saga_id)
        assert ids(receive_until(dying, 1)) == [saga_id]  # and "dying" never acknowledges
        if self.redelivers:
            again = receive_until(survivor, 1)
            assert ids(again) == [saga_id]
            survivor.ack(again)
            assert survivor.receive(10, 0.3) == []
        else:
            # Not promised: the delivery left the queue when it was received.
            assert survivor.receive(10, 0.3) == []

    def test_close_releases_the_transport(self, make: Make) -> None:
        transport = make()
        transport.publish(new_id())
        transport.close()


class TestInProcessQueue(TransportContract):
    redelivers = False

    @pytest.fixture
    def make(self) -> Iterator[Make]:
        # One queue per process: every "consumer" is a thread reading the same queue.
        shared = InProcessQueue()
        yield lambda consumer="worker", **options: shared


@pytest.fixture
def make_redis(redis_url: str, prefix: str, client: redis.Redis) -> Iterator[MakeRedis]:
    """Build Redis transports on this test's prefix; closed when the test ends."""
    made: list[RedisStreamsTransport] = []

    def make(consumer: str = "worker", **options: Any) -> RedisStreamsTransport:
        options.setdefault("prefix", prefix)
        transport = RedisStreamsTransport(redis_url, consumer=consumer, **options)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


@pytest.mark.redis
class TestRedisStreams(TransportContract):
    redelivers = True

    @pytest.fixture
    def make(self, make_redis: Make) -> Iterator[Make]:
        yield make_redis


# -- Redis only: key layout, poison entries, outages ------------------------------


@pytest.mark.redis
def test_keys_live_under_the_prefix(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    transport = make_redis()
    transport.publish(new_id())
    transport.ack(receive_until(transport, 1))
    assert {k.decode() for k in client.scan_iter(f"{prefix}:*")} == {f"{prefix}:work"}
    groups = client.xinfo_groups(f"{prefix}:work")
    assert [(g["name"], g["pending"]) for g in groups] == [(b"workers", 0)]


@pytest.mark.redis
def test_two_prefixes_share_a_redis_without_crossing(make_redis: MakeRedis, prefix: str) -> None:
    ours, theirs = make_redis(), make_redis(prefix=f"{prefix}-other")
    mine = new_id()
    ours.publish(mine)
    assert theirs.receive(10, 0.3) == []
    assert ids(receive_until(ours, 1)) == [mine]


@pytest.mark.redis
def test_the_stream_is_trimmed_to_about_maxlen(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    transport = make_redis(maxlen=10)
    for _ in range(1000):
        transport.publish(new_id())
    # Approximate trimming drops whole nodes of the stream (100 entries by default).
    assert client.xlen(f"{prefix}:work") < 300


@pytest.mark.redis
def test_malformed_entries_go_to_the_poison_stream(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    transport = make_redis()
    work = f"{prefix}:work"
    good = new_id()
    client.xadd(work, {"something": "else"})
    client.xadd(work, {"saga_id": b"\xff\xfe not text"})
    client.xadd(work, {"saga_id": "DROP TABLE saga_instances"})
    transport.publish(good)

    got = receive_until(transport, 1)
    assert ids(got) == [good]
    transport.ack(got)

    records = sorted(transport.poison(), key=lambda r: r.source_id)
    assert [r.fields for r in records] == [
        {b"something": b"else"},
        {b"saga_id": b"\xff\xfe not text"},
        {b"saga_id": b"DROP TABLE saga_instances"},
    ]
    assert "no saga_id field" in records[0].reason
    assert "not UTF-8" in records[1].reason
    assert "not a saga id" in records[2].reason
    # Acknowledged: nothing pending, nothing delivered again.
    assert client.xpending(work, "workers")["pending"] == 0
    assert transport.receive(10, 0.2) == []


@pytest.mark.redis
def test_an_unknown_but_well_formed_id_is_delivered(make_redis: MakeRedis) -> None:
    # Whether it names a saga is the store's business: the worker's claim finds nothing.
    transport = make_redis()
    stranger = new_id()
    transport.publish(stranger)
    assert ids(receive_until(transport, 1)) == [stranger]


@pytest.mark.redis
def test_the_group_comes_back_after_redis_lost_everything(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    transport = make_redis()
    transport.publish(new_id())
    receive_until(transport, 1)  # delivered, never acknowledged: Redis loses it below
    client.delete(f"{prefix}:work")  # what FLUSHALL does to this deployment's keys
    after = new_id()
    transport.publish(after)
    got = receive_until(transport, 1)
    assert ids(got) == [after]
    transport.ack(got)
    assert client.xpending(f"{prefix}:work", "workers")["pending"] == 0


@pytest.mark.redis
def test_killed_connections_are_replaced(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    transport = make_redis(consumer="victim")
    transport.publish(new_id())
    transport.ack(receive_until(transport, 1))
    for info in client.client_list():
        if info["name"] == f"{prefix}:victim":
            client.client_kill_filter(_id=info["id"])
    again = new_id()
    transport.publish(again)
    assert ids(receive_until(transport, 1)) == [again]


def test_an_unreachable_redis_raises_transport_error() -> None:
    transport = RedisStreamsTransport("redis://127.0.0.1:1/0", prefix="nowhere")
    with pytest.raises(
        TransportError, match=r"could not send to nowhere:work: Redis at 127\.0\.0\.1:1/0"
    ):
        transport.publish(new_id())
    with pytest.raises(TransportError, match=r"could not read nowhere:work: .*keep polling"):
        transport.receive(10, 0.1)
    transport.close()


def test_a_prefix_with_spaces_is_refused() -> None:
    from engine.errors import InvalidInput

    with pytest.raises(InvalidInput, match="SAGA_REDIS_PREFIX"):
        RedisStreamsTransport("redis://127.0.0.1:6379/0", prefix="my app")


# -- Redis only: what the bus underneath does for the doorbells -----------------------


@pytest.mark.redis
def test_a_poison_record_keeps_the_entry_and_says_where_it_came_from(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    transport = make_redis()
    source_id = client.xadd(f"{prefix}:work", {"saga_id": "nope", "extra": b"\x00\xff"}).decode()
    before = int(time.time() * 1000)

    assert transport.receive(10, 0.2) == []

    [record] = transport.poison()
    assert record.source_id == source_id
    assert record.source_stream == f"{prefix}:work"
    assert record.reason == "saga_id 'nope' is not a saga id (a UUID)"
    assert before - 1000 <= record.at <= int(time.time() * 1000)
    assert record.fields == {b"saga_id": b"nope", b"extra": b"\x00\xff"}
    assert client.xpending(f"{prefix}:work", "workers")["pending"] == 0


@pytest.mark.redis
def test_a_doorbell_taken_over_too_often_is_set_aside(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    # Every worker that takes this doorbell dies (here: never acknowledges it).
    first, second, third, fourth = (
        make_redis(consumer=name, claim_idle_seconds=0.05, max_deliveries=2)
        for name in ("first", "second", "third", "fourth")
    )
    saga_id = new_id()
    first.publish(saga_id)
    [delivered] = receive_until(first, 1)  # delivery 1
    time.sleep(0.1)
    assert second.receive(10, 0.2) == [delivered]  # delivery 2: taken over, within the cap
    time.sleep(0.1)

    assert third.receive(10, 0.2) == []  # delivery 3 would be one too many

    [record] = third.poison()
    assert record.reason == (
        "delivered 3 times and never acknowledged "
        "(every reader that took it died or hung); set aside"
    )
    assert (record.source_id, record.source_stream) == (delivered.message_id, f"{prefix}:work")
    assert record.fields == {b"saga_id": saga_id.encode()}
    assert client.xpending(f"{prefix}:work", "workers")["pending"] == 0
    time.sleep(0.1)
    assert fourth.receive(10, 0.2) == []


@pytest.mark.redis
def test_consumers_of_dead_workers_are_removed(
    make_redis: MakeRedis, client: redis.Redis, prefix: str
) -> None:
    work = f"{prefix}:work"
    # Scans every 1 s; the held doorbell becomes claimable only after 2 s.
    me = make_redis(consumer="me", claim_idle_seconds=2.0, forget_idle_seconds=0.2)
    dead, holding = make_redis(consumer="dead"), make_redis(consumer="holding")
    for _ in range(3):
        me.publish(new_id())
    me.ack(receive_until(me, 1))  # its first scan went round before anyone was idle
    dead.ack(receive_until(dead, 1))  # then this worker died holding nothing
    receive_until(holding, 1)  # this one died holding a doorbell
    time.sleep(1.1)

    assert me.receive(10, 0.05) == []  # the next scan goes round and looks at the consumers

    consumers = {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(work, "workers")}
    assert consumers == {"me": 0, "holding": 1}


def test_settings_carry_the_redelivery_cap() -> None:
    from engine.errors import InvalidInput
    from engine.settings import Settings
    from engine.transport.redis_streams import RedisStreams

    env = {"SAGA_REDIS_URL": "redis://127.0.0.1:1/0", "SAGA_REDIS_MAX_DELIVERIES": "4"}
    settings = Settings.from_env(env)
    assert settings.redis_max_deliveries == 4
    assert Settings.from_env({}).redis_max_deliveries == 10
    transport, bus = (
        RedisStreamsTransport.from_settings(settings),
        RedisStreams.from_settings(settings),
    )
    assert transport.max_deliveries == bus.max_deliveries == 4
    transport.close()
    bus.close()
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(InvalidInput, match="SAGA_REDIS_MAX_DELIVERIES"):
            Settings.from_env({**env, "SAGA_REDIS_MAX_DELIVERIES": bad})
    with pytest.raises(InvalidInput, match="SAGA_REDIS_MAX_DELIVERIES"):
        RedisStreamsTransport("redis://127.0.0.1:1/0", max_deliveries=0)
