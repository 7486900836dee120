"""The input boundary: what every value from outside must pass before it reaches the engine.

A URL, a form, a CLI argument, an API body or a library call can carry values the
store would refuse (PostgreSQL holds no U+0000 in text; neither store can encode a
lone surrogate), values that overflow a column (a bigint timestamp) or Python
itself (``int()`` of more than 4,300 digits), and digits that pass
``str.isdigit()`` but are not ASCII (``"²"``). Each check here raises
:class:`~engine.errors.InvalidInput` naming the field, so a database error is
never the answer to bad input, and a 503 always means the store is really down.

Limits that users see (documented in docs/defining-sagas.md and docs/console.md):

- identifiers a caller chooses (business key, correlation id, idempotency key,
  actor names): at most :data:`MAX_KEY` characters;
- ids the engine gave out (a saga id, a bulk operation's id): at most
  :data:`MAX_ID` characters;
- names in a definition (saga, step), when a caller filters by them: at most
  :data:`MAX_NAME` characters;
- free text (reasons): at most :data:`MAX_REASON` characters;
- integers: ASCII digits only, within the range each field names.

Reads check what they are asked to match too (:func:`check_id`,
:func:`check_filter`): a filter with a NUL is refused as bad input, not
answered with a database error.
"""

from __future__ import annotations

import re

from engine.errors import InvalidInput

#: Business keys, correlation ids, idempotency keys: what a caller chooses to find an instance by.
MAX_KEY = 200
#: A saga id or a bulk operation's id: the engine writes them as UUIDs (36 characters).
MAX_ID = 36
#: A saga's or a step's name (docs/defining-sagas.md).
MAX_NAME = 100
#: An operator's reason for an action.
MAX_REASON = 2000
#: The largest value of a 64-bit column (timestamps, ids).
MAX_BIGINT = 2**63 - 1
#: The largest value of a 32-bit column (step indexes, attempts, counts).
MAX_INT32 = 2**31 - 1

_ASCII_INTEGER = re.compile(r"-?[0-9]+")
# More digits than any value a column or a range here can hold: refused before int().
_MAX_DIGITS = 20


def problem_in_text(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None: a NUL, or a lone surrogate."""
    if "\x00" in value:
        return "cannot contain the NUL character (U+0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (a lone surrogate at position {exc.start})"
    return None


def check_text(field: str, value: str, *, limit: int, strip: bool = True) -> str:
    """``value`` (stripped) if it is non-empty, storable and at most ``limit`` characters."""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be text")
    text = value.strip() if strip else value
    if not text:
        raise InvalidInput(field, "must not be empty")
    problem = problem_in_text(text)
    if problem is not None:
        raise InvalidInput(field, problem)
    if len(text) > limit:
        raise InvalidInput(field, f"is {len(text):,} characters; the limit is {limit:,}")
    return text


def optional_text(field: str, value: str | None, *, limit: int) -> str | None:
    """As :func:`check_text`, but None or blank text means "not given" (None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return check_text(field, value, limit=limit)


def check_key(field: str, value: str | None) -> str | None:
    """A caller's identifier (business key, correlation id, idempotency key), unchanged.

    Keys are matched exactly, so they are not stripped; but they must not be blank.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "must be a non-empty string")
    return check_text(field, value, limit=MAX_KEY, strip=False)


def check_id(field: str, value: str) -> str:
    """An id the engine gave out (a saga id, a bulk operation's id), as the caller typed it.

    Ids are matched exactly, so they are not stripped. One too long to be an id is
    refused here rather than looked up: no stored row could have it.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "must be a non-empty string")
    return check_text(field, value, limit=MAX_ID, strip=False)


def check_filter(field: str, value: str | None, *, limit: int) -> str | None:
    """A value a read matches against the store (a name, a search), unchanged, or None.

    Refused when the store could not take it as a parameter (a NUL, a lone
    surrogate) or when it is longer than any stored value it could match.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, "must be text")
    problem = problem_in_text(value)
    if problem is not None:
        raise InvalidInput(field, problem)
    if len(value) > limit:
        raise InvalidInput(field, f"is {len(value):,} characters; the limit is {limit:,}")
    return value


def parse_int(field: str, raw: str, *, low: int = 0, high: int = MAX_BIGINT) -> int:
    """The integer written in ``raw`` (ASCII digits, an optional minus), within [low, high]."""
    text = raw.strip() if isinstance(raw, str) else ""
    shown = text if len(text) <= 40 else text[:40] + "…"
    wanted = f"{shown!r} is not a whole number from {low:,} to {high:,}"
    if not _ASCII_INTEGER.fullmatch(text) or len(text.lstrip("-")) > _MAX_DIGITS:
        raise InvalidInput(field, wanted)
    if not low <= int(text) <= high:
        raise InvalidInput(field, wanted)
    return int(text)


def check_millis(field: str, value: int | None) -> int | None:
    """An epoch-milliseconds bound a caller passed: None, or within a bigint column."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BIGINT
    ):
        raise InvalidInput(field, f"must be epoch milliseconds from 0 to {MAX_BIGINT:,}")
    return value


def optional_int(
    field: str, raw: str | None, *, low: int = 0, high: int = MAX_BIGINT
) -> int | None:
    """As :func:`parse_int`, but a missing or blank value is None."""
    if raw is None or not raw.strip():
        return None
    return parse_int(field, raw, low=low, high=high)
