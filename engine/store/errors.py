"""The store's failures, as the layers above see them.

Everything above the store names these instead of importing SQLAlchemy::

    StoreError            anything the store raised (SQLAlchemy's SQLAlchemyError)
    └── DatabaseError     what the database or its driver reported: unreachable,
                          refused, timed out... (SQLAlchemy's DBAPIError)

A ``DatabaseError`` is what the console answers with 503 and the CLI with "the
store failed". The engine's own errors (``SagaNotFound``, ``ConcurrencyConflict``,
``InvalidInput``...) live in :mod:`engine.errors`; the store raises those too.
"""

from __future__ import annotations

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
