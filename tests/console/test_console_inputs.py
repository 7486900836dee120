"""Hostile input at the console's doors: refused with 400 naming the field, never a 5xx.

On PostgreSQL a NUL in any text parameter used to come back as "the console
cannot reach the saga store" (503, with a traceback in the log), and digits
that ``str.isdigit()`` takes but ``int()`` does not (``²``), or numbers past
Python's 4,300-digit limit, as a 500. Each case here runs on SQLite and on
PostgreSQL, and checks the page names what was wrong and nothing was written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import SagaEngine
from engine.errors import InvalidInput
from engine.model import Instance
from tests.console.support import PASSWORD, dead_lettered, make_app, make_engine, sign_in, text
from tests.helpers.snapshot import StoreSnapshot

BIG = "1" * 5000  # past Python's int() limit of 4,300 digits


@pytest.fixture
def saga_engine(store_url: str) -> Iterator[SagaEngine]:
    eng = make_engine(store_url)
    yield eng
    eng.close()


@pytest.fixture
def snapshot(store_url: str) -> Iterator[StoreSnapshot]:
    taker = StoreSnapshot(store_url)
    yield taker
    taker.close()


@pytest.fixture
def failed(saga_engine: SagaEngine) -> Instance:
    return dead_lettered(saga_engine)


def assert_refused(response: object, *fragments: str) -> None:
    """A 400 page that says what was wrong and shows no traceback."""
    page = text(response).replace("&#39;", "'")
    assert response.status_code == 400, page  # type: ignore[attr-defined]
    assert "Traceback" not in page
    for fragment in fragments:
        assert fragment in page


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/search?q=%00", "invalid q"),
        ("/sagas?saga=%00", "invalid saga"),
        ("/sagas?saga=order%00", "invalid saga"),
        ("/audit?actor=%00", "invalid actor"),
        ("/audit?saga_id=%00", "invalid saga id"),
        ("/dead-letters?saga=%00", "invalid saga"),
        ("/dead-letters?step=%00", "invalid step"),
        ("/sagas/%00", "invalid saga id"),
        ("/sagas/x%00y/actions/retry", "invalid saga id"),
        ("/dead-letters/%00/retry", "invalid saga id"),
        ("/bulk/x%00", "invalid operation id"),
        ("/bulk?before=%00", "invalid before"),
    ],
)
def test_a_nul_in_a_filter_or_a_path_is_400_not_a_store_outage(
    path: str, field: str, admin: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = admin.get(path)

    assert_refused(response, field, "cannot contain the NUL character")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_nul_in_a_reason_is_400_and_applies_nothing(
    operator: FlaskClient, failed: Instance, snapshot: StoreSnapshot
) -> None:
    before = snapshot.take()
    response = operator.post(
        f"/sagas/{failed.id}/actions/cancel",
        data={"reason": "by\x00hand", "expected_version": failed.version},
    )
    assert_refused(response, "invalid reason", "NUL")
    assert snapshot.take() == before


def test_a_nul_in_the_sign_in_name_is_400_for_anyone(
    anon: FlaskClient, snapshot: StoreSnapshot, caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot.take()
    response = anon.post("/login", data={"name": "admin\x00", "password": PASSWORD})
    assert_refused(response, "invalid name", "NUL")
    assert snapshot.take() == before  # not even a failed sign-in is counted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("number", ["%C2%B2", "%D9%A3", BIG, "-1", "99999999999999999999999"])
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/audit?before={}", "invalid before"),
        ("/sagas?cursor={}", "invalid cursor"),
        ("/dead-letters?before={}", "invalid"),
        ("/poison?limit={}", "invalid limit"),
    ],
)
def test_numbers_that_are_not_ascii_digits_in_range_are_400(
    path: str, field: str, number: str, admin: FlaskClient
) -> None:
    assert_refused(admin.get(path.format(number)), field)


@pytest.mark.parametrize("number", ["%C2%B2", BIG, "-1", "1.0"])
@pytest.mark.parametrize("page", ["actions/retry", "actions/cancel"])
def test_a_version_that_is_not_a_number_is_400(
    page: str, number: str, operator: FlaskClient, failed: Instance
) -> None:
    response = operator.get(f"/sagas/{failed.id}/{page}?version={number}")
    assert_refused(response, "invalid version", "not a whole number")


@pytest.mark.parametrize("number", ["²", "٣", BIG, "0"])
def test_the_version_an_action_form_carries_must_be_ascii_digits(
    number: str, operator: FlaskClient, failed: Instance, snapshot: StoreSnapshot
) -> None:
    before = snapshot.take()
    response = operator.post(
        f"/sagas/{failed.id}/actions/cancel",
        data={"reason": "customer gave up", "expected_version": number},
    )
    assert response.status_code == 400
    assert "not a whole number" in text(response)
    assert snapshot.take() == before


@pytest.mark.parametrize(
    ("field", "number"),
    [("batch_size", "²"), ("batch_size", BIG), ("batch_size", "٣"), ("batch_size", "1_0")],
)
def test_the_bulk_forms_numbers_must_be_ascii_digits(
    field: str, number: str, operator: FlaskClient, failed: Instance, snapshot: StoreSnapshot
) -> None:
    before = snapshot.take()
    form = {"action": "retry", "state": "failed", "reason": "outage over", "snapshot": "x" * 20}
    response = operator.post("/bulk", data={**form, field: number})
    assert_refused(response, f"invalid {field}", "not a whole number")
    assert snapshot.take() == before


@pytest.mark.parametrize(
    "target",
    [
        "/audit\r\nSet-Cookie: owned=1",  # a header of the attacker's, or a 500
        "/audit\n",
        "//[::1",  # urlsplit raises on it
        "/audit?" + "x" * 5000,
    ],
)
def test_a_next_page_that_cannot_be_a_location_signs_in_to_the_list(
    target: str, anon: FlaskClient
) -> None:
    response = anon.post("/login", data={"name": "viewer", "password": PASSWORD, "next": target})
    assert response.status_code == 302
    assert response.headers["Location"] == "/sagas"


def test_a_good_next_page_still_works(anon: FlaskClient) -> None:
    response = anon.post(
        "/login", data={"name": "viewer", "password": PASSWORD, "next": "/audit?actor=al"}
    )
    assert response.headers["Location"] == "/audit?actor=al"


def test_the_trusted_proxies_setting_must_be_ascii_digits(
    saga_engine: SagaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_CONSOLE_TRUSTED_PROXIES", "²")
    with pytest.raises(InvalidInput, match="SAGA_CONSOLE_TRUSTED_PROXIES"):
        make_app(saga_engine)


def test_the_backstop_names_a_form_field_no_view_reads(
    app: Flask, failed: Instance, snapshot: StoreSnapshot
) -> None:
    client = sign_in(app.test_client(), "operator")
    before = snapshot.take()
    response = client.post(
        f"/dead-letters/{failed.id}/edit-retry",
        data={
            "reason": "fix the address",
            "expected_version": failed.version,
            "payload": '{"amount": 5}',
            "extra_field": "\x00",
        },
    )
    assert_refused(response, "invalid extra field", "NUL")
    assert snapshot.take() == before


def test_a_payload_with_a_number_past_the_digit_limit_is_shown_again_with_why(
    operator: FlaskClient, failed: Instance, snapshot: StoreSnapshot
) -> None:
    before = snapshot.take()
    response = operator.post(
        f"/dead-letters/{failed.id}/edit-retry",
        data={"reason": "fix it", "expected_version": failed.version, "payload": BIG},
    )
    assert response.status_code == 400
    assert "a number in it has too many digits" in text(response)
    assert snapshot.take() == before
