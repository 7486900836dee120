"""The Set aside page: the newest records of the Redis poison stream, read-only.

The records are made the way the engine makes them: a real reply listener sets
aside a malformed reply, a real reader sets aside an entry taken over too
often, and the bus sets aside a command and a refused reply read from their streams.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from flask.testing import FlaskClient
from markupsafe import escape

from console.formatting import timestamp
from console.poison import Why, describe, visible
from engine import SagaEngine, Settings
from engine.remote.messages import BadMessage, Command
from engine.remote.replies import ReplyListener
from engine.transport.commands import PARTICIPANTS, WORKERS
from engine.transport.redis_streams import RedisStreams
from engine.transport.streams import PoisonRecord
from tests.console.console_sagas import SAGAS
from tests.console.support import make_app, sign_in, text
from tests.helpers.engines import wait_for

HOSTILE = b"<script>alert(1)</script>\x00\x1b[31m\xfe"


def redis_engine_on(database_url: str, redis_url: str, prefix: str) -> SagaEngine:
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        worker_id="test-worker",
        poll_seconds=0.05,
    )
    return SagaEngine(SAGAS, settings=settings)


@pytest.fixture
def redis_engine(
    sqlite_url: str, redis_url: str, prefix: str, client: redis.Redis
) -> Iterator[SagaEngine]:
    eng = redis_engine_on(sqlite_url, redis_url, prefix)
    yield eng
    eng.close()


@pytest.fixture
def on_redis(redis_engine: SagaEngine) -> FlaskClient:
    """A viewer of the console whose engine reads and writes Redis."""
    return sign_in(make_app(redis_engine).test_client(), "viewer")


@dataclass(frozen=True)
class SetAside:
    """What the ``poisoned`` fixture put on the poison stream, oldest first."""

    saga_id: str
    command: str  # source ids
    reply: str
    pill: str
    refused: str

    @property
    def newest_first(self) -> list[str]:
        return [self.refused, self.pill, self.reply, self.command]


@pytest.fixture
def poisoned(
    redis_engine: SagaEngine, redis_url: str, prefix: str, client: redis.Redis
) -> SetAside:
    bus = redis_engine.bus
    assert isinstance(bus, RedisStreams)
    poison = f"{prefix}:poison"
    saga_id = redis_engine.start("order", {"amount": 5}).id

    # A command of an unknown wire version (with HTML in it), naming a real saga.
    hotel = bus.commands_stream("hotel")
    body = json.dumps({"b": 1, "a": "<b>bold</b>"})
    bus.send(hotel, {"v": "<i>9</i>", "command": "hotel.do", "saga_id": saga_id, "body": body})
    [command] = bus.read([hotel], PARTICIPANTS, "test", 1, 1.0)
    with pytest.raises(BadMessage) as bad:
        Command.from_fields(command.fields)
    bus.poison(PARTICIPANTS, command, str(bad.value))

    # A reply that is not UTF-8, with HTML and control characters: the worker's
    # reply listener sets it aside.
    reply_id = client.xadd(
        bus.replies_stream,
        {"v": "1", "outcome": "success", "saga_id": b"\x80\x81", "note": HOSTILE},
    ).decode()
    listener = ReplyListener(redis_engine.collaborators).start()
    wait_for(lambda: client.xlen(poison) == 2)
    assert listener.stop()

    # An entry every reader that took it "died" on: the second delivery is one too many.
    readers = RedisStreams(redis_url, prefix=prefix, claim_idle_seconds=0.05, max_deliveries=1)
    car = readers.commands_stream("car")
    readers.send(car, {"n": "pill"})
    [pill] = readers.read([car], PARTICIPANTS, "dies", 1, 1.0)
    time.sleep(0.1)
    assert readers.read([car], PARTICIPANTS, "lives", 1, 0.05) == []
    readers.close()
    assert client.xlen(poison) == 3

    # A reply the store refused.
    bus.send(bus.replies_stream, {"v": "1", "saga_id": saga_id, "outcome": "success"})
    [refused] = bus.read([bus.replies_stream], WORKERS, "test", 1, 1.0)
    bus.poison(WORKERS, refused, "the store refused it: value out of range")
    return SetAside(saga_id, command.id, reply_id, pill.id, refused.id)


def rows(html: str) -> dict[str, str]:
    """The page's rows by the source entry id they show, in page order."""
    found = {}
    for row in html.split('<tr id="poison-')[1:]:
        source_id = re.search(r'<td class="mono">(\d+-\d+)<div', row)
        assert source_id is not None, row
        found[source_id.group(1)] = row.split("</tr>")[0]
    return found


# -- who may see it ----------------------------------------------------------------------


def test_needs_a_signed_in_user(anon: FlaskClient) -> None:
    response = anon.get("/poison")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]


def test_is_in_the_navigation_next_to_the_dead_letters(viewer: FlaskClient) -> None:
    nav = text(viewer.get("/dead-letters")).split('class="mainnav"')[1].split("</nav>")[0]
    assert nav.index('href="/dead-letters"') < nav.index('href="/poison"')
    assert re.search(r'href="/poison"\s+class="active">Set aside', text(viewer.get("/poison")))


# -- on Redis ----------------------------------------------------------------------------


@pytest.mark.redis
def test_a_viewer_sees_the_records_newest_first(
    on_redis: FlaskClient, poisoned: SetAside, redis_engine: SagaEngine, prefix: str
) -> None:
    response = on_redis.get("/poison")
    assert response.status_code == 200
    shown = rows(text(response))
    assert list(shown) == poisoned.newest_first

    records = {r.source_id: r for r in redis_engine.bus.poison_records(10)}  # type: ignore[attr-defined]
    for source_id, row in shown.items():
        assert timestamp(records[source_id].at) in row
    command, reply = shown[poisoned.command], shown[poisoned.reply]
    pill, refused = shown[poisoned.pill], shown[poisoned.refused]
    assert f"{prefix}:commands:hotel" in command and "wire version" in command
    assert f"{prefix}:replies" in reply and "not UTF-8" in reply
    assert f"{prefix}:commands:car" in pill
    assert "delivered 2 times and never acknowledged" in pill
    assert f"{prefix}:replies" in refused
    assert "the store refused it: value out of range" in refused
    for row, why in ((command, "malformed"), (reply, "malformed"), (pill, "redelivered")):
        assert f'class="badge why why-{why}">{why}</span>' in row
    assert 'class="badge why why-refused">refused by the store</span>' in refused


@pytest.mark.redis
def test_links_the_saga_a_command_or_reply_names(on_redis: FlaskClient, poisoned: SetAside) -> None:
    shown = rows(text(on_redis.get("/poison")))
    link = f'href="/sagas/{poisoned.saga_id}"'
    assert link in shown[poisoned.command] and link in shown[poisoned.refused]
    assert "/sagas/" not in shown[poisoned.reply]  # its saga_id is not even UTF-8
    assert "/sagas/" not in shown[poisoned.pill]
    assert on_redis.get(f"/sagas/{poisoned.saga_id}").status_code == 200


@pytest.mark.redis
def test_raw_fields_are_escaped_and_made_readable(
    on_redis: FlaskClient, poisoned: SetAside
) -> None:
    html = text(on_redis.get("/poison"))
    assert "<script>" not in html and "<b>bold</b>" not in html and "<i>9</i>" not in html
    assert "wire version &#39;&lt;i&gt;9&lt;/i&gt;&#39;" in rows(html)[poisoned.command]
    assert "\x00" not in html and "\x1b" not in html
    reply = rows(html)[poisoned.reply]
    assert "<details>" in reply
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x00\\x1b[31m\ufffd" in reply
    assert "\ufffd\ufffd" in reply  # the saga_id's two bytes that are not UTF-8
    pretty = json.dumps({"a": "<b>bold</b>", "b": 1}, indent=2, sort_keys=True)
    assert str(escape(pretty)) in rows(html)[poisoned.command]


@pytest.mark.redis
def test_the_limit_shows_the_newest(on_redis: FlaskClient, poisoned: SetAside) -> None:
    response = on_redis.get("/poison?limit=2")
    assert response.status_code == 200
    assert list(rows(text(response))) == poisoned.newest_first[:2]
    assert "The newest 2 records are shown" in text(response)
    assert list(rows(text(on_redis.get("/poison?limit=500")))) == poisoned.newest_first


@pytest.mark.redis
def test_an_empty_poison_stream(on_redis: FlaskClient) -> None:
    response = on_redis.get("/poison")
    assert response.status_code == 200
    assert "The poison stream is empty" in text(response)


@pytest.mark.parametrize("limit", ["abc", "0", "501", "-1", "1.5", "\uff11", "9" * 30])
def test_a_bad_limit_is_400(viewer: FlaskClient, limit: str) -> None:
    response = viewer.get("/poison", query_string={"limit": limit})
    assert response.status_code == 400
    assert "limit" in text(response) and "1 to 500" in text(response)


def test_without_redis_it_says_so(viewer: FlaskClient) -> None:
    response = viewer.get("/poison")
    assert response.status_code == 200
    page = text(response)
    assert 'id="poison-no-redis"' in page and "runs without Redis" in page
    assert 'id="poison-unreachable"' not in page


def test_an_unreachable_redis_is_503_with_the_message(sqlite_url: str) -> None:
    eng = redis_engine_on(sqlite_url, "redis://127.0.0.1:1/0", "test-psn-down")
    try:
        response = sign_in(make_app(eng).test_client(), "viewer").get("/poison")
    finally:
        eng.close()
    assert response.status_code == 503
    page = text(response)
    assert 'id="poison-unreachable"' in page
    assert "Redis at 127.0.0.1:1/0 is unreachable" in page
    assert "Traceback" not in page


# -- the pure parts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "why"),
    [
        ("delivered 11 times and never acknowledged (...); set aside", Why.REDELIVERED),
        ("the store refused it: value out of range", Why.REFUSED),
        ("no saga_id field (fields: b'x')", Why.MALFORMED),
        ("delivered badly", Why.MALFORMED),
        ("", Why.MALFORMED),
    ],
)
def test_why_is_read_from_the_reason(reason: str, why: Why) -> None:
    assert Why.of(reason) is why


def test_visible_escapes_control_and_bidi_characters_only() -> None:
    assert visible("plain <b> text\twith\nlines é 🙂") == "plain <b> text\twith\nlines é 🙂"
    assert visible("a\x00b\x1b\x7f\x85c") == "a\\x00b\\x1b\\x7f\\x85c"
    assert visible("abc\u202edef") == "abc\\u202edef"


def test_describe_keeps_field_order_and_pretty_prints_a_json_body() -> None:
    saga_id = str(uuid.uuid4())
    record = PoisonRecord(
        id="2-0",
        source_id="1-0",
        reason="bad",
        at=0,
        fields={b"saga_id": saga_id.encode(), b"body": b'{"z": [1], "a": "\x7f"}', b"n": b"\xff"},
    )
    shown = describe(record)
    assert shown.saga_id == saga_id
    assert [(f.name, f.json) for f in shown.fields] == [
        ("saga_id", False),
        ("body", True),
        ("n", False),
    ]
    assert shown.fields[1].value == '{\n  "a": "\\x7f",\n  "z": [\n    1\n  ]\n}'
    assert shown.fields[2].value == "\ufffd"
    assert describe(PoisonRecord("2-0", "1-0", "", 0, {b"saga_id": b"x"})).saga_id is None
    assert describe(PoisonRecord("2-0", "1-0", "", 0, {b"body": b"{"})).fields[0].json is False
