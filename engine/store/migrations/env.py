"""Alembic environment: the store's metadata, on the URL the engine is configured with."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from engine.store.schema import metadata
from engine.store.urls import normalise_url

config = context.config


def run_migrations() -> None:
    url = normalise_url(config.get_main_option("sqlalchemy.url") or "")
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = engine_from_config(
        {"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as conn:
        _run(conn)


def _run(conn: Connection) -> None:
    # render_as_batch lets ALTERs work on SQLite, which cannot alter columns in place.
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
