"""The input boundary (engine.inputs): hostile text and numbers are refused with the field named."""

from __future__ import annotations

import pytest

from engine.errors import InvalidInput
from engine.inputs import (
    MAX_BIGINT,
    MAX_KEY,
    check_key,
    check_text,
    optional_int,
    optional_text,
    parse_int,
)


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
    with pytest.raises(InvalidInput, match="between 1 and 10"):
        parse_int("batch", "11", low=1, high=10)
    with pytest.raises(InvalidInput, match="between 0"):
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
