"""The input boundary (engine.inputs): hostile text and numbers are refused with the field named.

Below the checks themselves, every door of the engine (reads, operations,
signals, bulk filters) is called with text the store could not take, on
SQLite and on PostgreSQL: each refuses it, naming the field, before the store
sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine import NO_RETRY, NonRetryableError, Saga, SagaEngine, Settings, StepContext
from engine.bulk.model import BulkFilter
from engine.choreography.handlers import BadEvent
from engine.choreography.handlers import parse as parse_event
from engine.errors import InvalidInput
from engine.inputs import (
    MAX_BIGINT,
    MAX_ID,
    MAX_KEY,
    check_filter,
    check_id,
    check_key,
    check_text,
    optional_int,
    optional_text,
    parse_int,
)
from engine.queries import InstanceFilter, Queries
from engine.store import open_store
from engine.transport.streams import Entry
from engine.users import UserStore
from tests.helpers.snapshot import StoreSnapshot


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0", 0), ("42", 42), (" 7 ", 7), (str(MAX_BIGINT), MAX_BIGINT)],
)
def test_whole_numbers_in_ascii_digits_are_read(raw: str, expected: int) -> None:
    assert parse_int("limit", raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "²",  # passes str.isdigit(), fails int()
        "٣",  # an Arabic-Indic digit: int() would take it
        "1" * 5000,  # over Python's 4,300-digit int() limit
        "99999999999999999999999",  # over a bigint column
        "1.5",
        "1e3",
        "",
        "0x10",
        "1_000",
    ],
)
def test_anything_else_is_refused_naming_the_field(raw: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_int("before", raw)
    assert err.value.field == "before"
    assert len(str(err.value)) < 200  # a 5,000-digit value is not echoed whole


def test_a_range_is_enforced() -> None:
    assert parse_int("batch", "10", low=1, high=10) == 10
    with pytest.raises(InvalidInput, match="'11' is not a whole number from 1 to 10"):
        parse_int("batch", "11", low=1, high=10)
    with pytest.raises(InvalidInput, match="from 0 to"):
        parse_int("limit", "-1")


def test_missing_numbers_are_none() -> None:
    assert optional_int("before", None) is None
    assert optional_int("before", "  ") is None
    assert optional_int("before", "3") == 3


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("a\x00b", "NUL"),
        ("\ud800", "lone surrogate"),
        ("x" * 201, "the limit is 200"),
        ("   ", "empty"),
    ],
)
def test_text_the_store_would_refuse_is_refused(value: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why) as err:
        check_text("reason", value, limit=200)
    assert err.value.field == "reason"


def test_text_is_stripped_and_control_characters_other_than_nul_are_kept() -> None:
    # Escape sequences are stored as given; every display neutralises them.
    assert check_text("reason", "  \x1b[2J tidy \r x ", limit=200) == "\x1b[2J tidy \r x"
    assert optional_text("q", "  ", limit=10) is None
    assert optional_text("q", None, limit=10) is None


def test_keys_are_matched_exactly_so_not_stripped() -> None:
    assert check_key("business key", " trip-1 ") == " trip-1 "
    assert check_key("business key", None) is None
    assert check_key("business key", "k" * MAX_KEY) == "k" * MAX_KEY
    with pytest.raises(InvalidInput, match="limit is 200"):
        check_key("business key", "k" * (MAX_KEY + 1))
    with pytest.raises(InvalidInput, match="non-empty"):
        check_key("business key", "")


def test_ids_are_matched_exactly_and_no_longer_than_an_id() -> None:
    assert check_id("saga id", " 0190-x ") == " 0190-x "
    assert check_id("saga id", "x" * MAX_ID) == "x" * MAX_ID
    for bad, why in [("", "non-empty"), ("a\x00", "NUL"), ("\udcff", "surrogate")]:
        with pytest.raises(InvalidInput, match=why):
            check_id("saga id", bad)
    with pytest.raises(InvalidInput, match="limit is 36"):
        check_id("saga id", "x" * (MAX_ID + 1))


def test_filters_are_kept_as_given_unless_the_store_could_not_take_them() -> None:
    assert check_filter("saga name", None, limit=5) is None
    assert check_filter("saga name", "", limit=5) == ""
    assert check_filter("saga name", " ab ", limit=5) == " ab "
    for bad, why in [("a\x00", "NUL"), ("\ud800", "surrogate"), ("abcdef", "limit is 5")]:
        with pytest.raises(InvalidInput, match=why) as err:
            check_filter("saga name", bad, limit=5)
        assert err.value.field == "saga name"


# -- the engine's doors: reads, operations, signals, bulk filters ---------------------------


def _step(ctx: StepContext) -> None:
    raise NonRetryableError("no")


def _undo(ctx: StepContext, output: Any) -> None:
    return None


DOOMED = Saga("doomed", default_retry=NO_RETRY, default_compensation_retry=NO_RETRY)
DOOMED.add_step("only", _step, _undo)

#: Text PostgreSQL refuses in any text parameter, and text neither store can encode.
NUL, SURROGATE = "x\x00y", "x\udcffy"

#: Each door of the engine, what it is called with, and the field it must name.
DOORS: list[tuple[str, str, Callable[[SagaEngine, str, str], object]]] = [
    (
        "list by saga",
        "saga name",
        lambda e, i, v: _q(e).list_instances(InstanceFilter(saga_name=v)),
    ),
    ("search", "search", lambda e, i, v: _q(e).list_instances(InstanceFilter(search=v))),
    ("counts", "saga name", lambda e, i, v: _q(e).counts_by_state(v)),
    ("capped counts", "saga name", lambda e, i, v: _q(e).counts_by_state_capped(10, v)),
    ("stuck count", "saga name", lambda e, i, v: _q(e).count_stuck(10, v)),
    ("stuck since", "saga id", lambda e, i, v: _q(e).stuck_since(v)),
    ("durations", "saga name", lambda e, i, v: _q(e).recent_step_durations(v)),
    ("timeline", "saga id", lambda e, i, v: _q(e).timeline(v)),
    ("dead letters", "saga id", lambda e, i, v: _q(e).dead_letters(saga_id=v)),
    ("dead-lettered", "saga name", lambda e, i, v: _q(e).dead_lettered(saga_name=v)),
    ("dead-lettered", "step name", lambda e, i, v: _q(e).dead_lettered(step_name=v)),
    ("audit", "saga id", lambda e, i, v: _q(e).operator_actions(saga_id=v)),
    ("audit", "actor", lambda e, i, v: _q(e).operator_actions(actor=v)),
    ("audit", "action", lambda e, i, v: _q(e).operator_actions(action=v)),
    ("get", "saga id", lambda e, i, v: e.get(v)),
    ("retry", "saga id", lambda e, i, v: e.operations.retry(v, actor="al", reason="r")),
    ("edit", "saga id", lambda e, i, v: e.operations.edit_and_retry(v, {}, actor="al", reason="r")),
    ("resolve", "saga id", lambda e, i, v: e.operations.resolve(v, actor="al", reason="r")),
    ("signal", "saga id", lambda e, i, v: e.signal(v, "approved")),
    ("signal", "event", lambda e, i, v: e.signal(i, v)),
    ("signal", "sender", lambda e, i, v: e.signal(i, "approved", sent_by=v)),
    ("bulk", "error text", lambda e, i, v: BulkFilter(error_text=v)),
    ("bulk", "step name", lambda e, i, v: BulkFilter(step_name=v)),
]


def _q(engine: SagaEngine) -> Queries:
    return Queries(engine.store)


@pytest.fixture
def doomed_engine(store_url: str) -> Iterator[SagaEngine]:
    eng = SagaEngine([DOOMED], settings=Settings(database_url=store_url, worker_id="t"))
    yield eng
    eng.close()


@pytest.mark.parametrize("value", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(("door", "field", "call"), DOORS, ids=[f"{d[0]}-{d[1]}" for d in DOORS])
def test_every_door_refuses_text_the_store_could_not_take_naming_the_field(
    door: str,
    field: str,
    call: Callable[[SagaEngine, str, str], object],
    value: str,
    doomed_engine: SagaEngine,
    store_url: str,
) -> None:
    target = doomed_engine.run("doomed").id  # an instance that exists, for the names' doors
    # Without the check, PostgreSQL answers a NUL with a DataError (a 503 in the console),
    # and either store fails to encode a lone surrogate.
    with pytest.raises(InvalidInput) as err:
        call(doomed_engine, target, value)
    assert err.value.field == field
    snapshot = StoreSnapshot(store_url)
    try:
        before = snapshot.take()
        with pytest.raises(InvalidInput):
            call(doomed_engine, target, value)
        assert snapshot.take() == before  # refused before anything was written
    finally:
        snapshot.close()


def test_an_audit_page_cursor_past_a_bigint_is_refused(doomed_engine: SagaEngine) -> None:
    # SQLite raises OverflowError (no database error at all) for such a parameter.
    with pytest.raises(InvalidInput, match="before"):
        Queries(doomed_engine.store).operator_actions(before_id=2**64)


@pytest.mark.parametrize("raw", ["²", "1" * 5000, "0"])
def test_a_whole_number_setting_in_odd_digits_is_refused_naming_it(raw: str) -> None:
    with pytest.raises(InvalidInput) as err:
        Settings.from_env({"SAGA_CONCURRENCY": raw})
    assert err.value.field == "SAGA_CONCURRENCY"


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("at", "²", "at is not epoch milliseconds"),
        ("at", "1" * 5000, "at is not epoch milliseconds"),
        ("correlation_id", "c\x00", "correlation_id cannot contain the NUL"),
    ],
)
def test_a_domain_event_the_store_could_not_take_is_malformed(
    field: str, value: str, why: str
) -> None:
    fields = {"id": "e1", "type": "Ping", "correlation_id": "c", "data": "{}", "at": "1"}
    fields[field] = value
    entry = Entry("events", "1-0", {k.encode(): v.encode() for k, v in fields.items()})
    with pytest.raises(BadEvent, match=why):
        parse_event(entry)


# -- the engine's own doors, for a library caller ----------------------------------


@pytest.mark.parametrize("bound", [-1, 2**63, 2**70])
def test_time_bounds_past_a_bigint_are_refused(store_url: str, bound: int) -> None:
    with pytest.raises(InvalidInput, match="epoch milliseconds"):
        Queries(open_store(store_url)).list_instances(InstanceFilter(created_from=bound))
    with pytest.raises(InvalidInput, match="epoch milliseconds"):
        BulkFilter(saga_name="trip", time_to=bound)


@pytest.mark.parametrize("name", ["ann\x00", "\ud800", "x" * 500, "not a name!"])
def test_users_by_a_name_that_cannot_exist_are_not_looked_up(store_url: str, name: str) -> None:
    users = UserStore(open_store(store_url).db)
    assert users.by_name(name) is None
    with pytest.raises(InvalidInput):
        users.set_role(name, "viewer")
    with pytest.raises(InvalidInput):
        users.set_disabled(name, True)


@pytest.mark.parametrize("operation_id", ["op\x00", "\ud800", "9" * 5000])
def test_bulk_operations_by_an_id_that_cannot_exist_are_refused(
    store_url: str, operation_id: str
) -> None:
    engine = SagaEngine(settings=Settings(database_url=store_url))
    try:
        recovery = engine.bulk_recovery()
        for call in (recovery.get, recovery.follow):
            with pytest.raises(InvalidInput, match="operation id"):
                call(operation_id)
        with pytest.raises(InvalidInput):
            recovery.stop(operation_id, "ann")
        with pytest.raises(InvalidInput, match="actor"):
            recovery.stop("01a24567-a2aa-7290-99c1-afefaa142f23", "a\x00b")
    finally:
        engine.close()
