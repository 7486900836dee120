"""Store URLs: which backend one names, how to show it, and the driver the store uses."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL whatever driver the URL names (or none)."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


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
