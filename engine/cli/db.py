"""``saga db upgrade|current``: the store's schema."""

from __future__ import annotations

import click

from engine.cli.context import Cli, check_url, pass_cli, schema_head
from engine.store import migrate, redacted, sqlite_path


@click.group("db")
def db() -> None:
    """The store's schema."""


@db.command("upgrade")
@pass_cli
def db_upgrade(cli: Cli) -> None:
    """Create the store, or bring its schema up to date (SAGA_DATABASE_URL)."""
    check_url(cli.url)
    migrate.upgrade(cli.url)
    click.echo(f"store {redacted(cli.url)} is at schema {migrate.current(cli.url)}")


@db.command("current")
@pass_cli
def db_current(cli: Cli) -> None:
    """Print the store's schema revision ("none" before `saga db upgrade`)."""
    check_url(cli.url)
    path = sqlite_path(cli.url)
    # Asking a SQLite store that is not there would create an empty file.
    revision = None if path is not None and not path.exists() else migrate.current(cli.url)
    head = schema_head(cli.url)
    note = "" if revision == head else f" (newest is {head}; run `saga db upgrade`)"
    click.echo(f"{revision or 'none'}{note}")
