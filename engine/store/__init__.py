"""The store: every SQL statement of the engine, on SQLite or PostgreSQL.

Only this package (and its migrations) imports SQLAlchemy. Everything above it
talks to :class:`Store` and the records it returns; a state change of an
instance is one transaction here (the instance row, its step rows and its
timeline events together).
"""

from engine.store.connection import Connection
from engine.store.errors import (
    DatabaseError,
    StoreError,
    backend_of,
    database_message,
    redacted,
    refused_for_its_data,
    sqlite_path,
)
from engine.store.repository import (
    DeadLetterRef,
    OperatorRecord,
    Overdue,
    PostgresStore,
    SqliteStore,
    Store,
    StoredSignal,
    StuckCandidate,
    StuckMark,
    dumps,
    has_nul,
    normalise_url,
    open_store,
    retry_on_disconnect,
)

__all__ = [
    "Connection",
    "DatabaseError",
    "DeadLetterRef",
    "OperatorRecord",
    "Overdue",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredSignal",
    "StuckCandidate",
    "StuckMark",
    "backend_of",
    "database_message",
    "dumps",
    "has_nul",
    "normalise_url",
    "open_store",
    "redacted",
    "refused_for_its_data",
    "retry_on_disconnect",
    "sqlite_path",
]
