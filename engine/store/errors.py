"""The store's failures, and its URLs, as the layers above see them.

Everything above the store names these instead of importing SQLAlchemy:
``StoreError`` is anything the store raised; ``DatabaseError`` is an error the
database (or the driver talking to it) reported, which is what the console
answers with 503 and the CLI with "the store failed".
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

#: Anything the store raised.
StoreError = SQLAlchemyError
#: An error the database or its driver reported (unreachable, refused, timed out...).
DatabaseError = DBAPIError


def database_message(exc: DatabaseError) -> str:
    """The database's own words for ``exc``, or the name of its error."""
    return str(exc.orig).strip() or type(exc.orig).__name__


def refused_for_its_data(exc: StoreError) -> bool:
    """True when the store refused what it was given (a value out of range, a broken
    constraint): trying the same again cannot help. Anything else (unreachable, busy,
    a schema behind its code) may pass later, so it is tried again."""
    return isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError)


def backend_of(url: str) -> str:
    """``sqlite``, ``postgresql``...; the empty string when ``url`` is not a database URL."""
    try:
        return sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError:
        return ""


def redacted(url: str) -> str:
    """``url`` with its password hidden, or as given when it does not parse."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for another backend or an in-memory database."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database or "")
