"""The store: every SQL statement of the engine, on SQLite or PostgreSQL.

Only this package (and its migrations) imports SQLAlchemy. Everything above it
talks to :class:`Store` and the records it returns; a state change of an
instance is one transaction here (the instance row, its step rows and its
timeline events together), and what it sets off outside the database (the
metrics) happens after its commit.

The modules, from the bottom:

- ``schema``: the tables; ``migrate`` and ``migrations/``: their history.
- ``rows``: instances as rows and back, and the JSON the store keeps.
- ``commits``: transactions, and the work that waits for their commit.
- ``timeline``, ``leases``: the statements of the records beside an instance
  and of its lease, composed into the store's transactions.
- ``sweeps``, ``reads``: the sweeps' and the read side's questions
  (``store.sweeps``, ``store.reads``).
- ``instances``: :class:`Store`, the instance lifecycle.
- ``backends``: SQLite and PostgreSQL, and :func:`open_store`.
- ``keys``, ``users``, ``bulk``, ``leader``: the idempotency guard's keys,
  console users, bulk operations and the sweeper's lock.
- ``errors``, ``urls``, ``connection``: names the layers above use instead of
  SQLAlchemy's.
"""

from engine.store.backends import PostgresStore, SqliteStore, open_store, retry_on_disconnect
from engine.store.commits import TransitionHook
from engine.store.connection import Connection, Database
from engine.store.errors import DatabaseError, StoreError, database_message, refused_for_its_data
from engine.store.instances import Store
from engine.store.reads import InstanceFilter, LiveCounts
from engine.store.rows import dumps, has_nul
from engine.store.sweeps import DeadLetterRef, Overdue, StuckCandidate, StuckMark
from engine.store.timeline import OperatorRecord, StoredSignal
from engine.store.urls import backend_of, normalise_url, redacted, sqlite_path

__all__ = [
    "Connection",
    "Database",
    "DatabaseError",
    "DeadLetterRef",
    "InstanceFilter",
    "LiveCounts",
    "OperatorRecord",
    "Overdue",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredSignal",
    "StuckCandidate",
    "StuckMark",
    "TransitionHook",
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
