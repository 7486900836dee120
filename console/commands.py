"""Click commands for the console: ``saga console`` and ``saga user add|list|set-role|disable``.

They are registered on the ``saga`` group in :mod:`engine.cli` and use its
settings and ``-A`` modules; run on their own (tests), they read the same
``SAGA_*`` variables. :func:`start_demo_console` serves the console beside
``saga demo``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from engine.errors import InvalidInput
from engine.settings import Settings
from engine.store import open_store
from engine.users import Role, UserStore

if TYPE_CHECKING:
    from console.serve import ConsoleServer
    from engine.cli import Cli
    from engine.runtime import SagaEngine

ROLES = [r.value for r in Role]
T = TypeVar("T")


@click.command("console")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0 picks a free one).",
)
def console_command(host: str, port: int) -> None:
    """Serve the operator console (for production use gunicorn 'console:create_app()')."""
    from console import create_app
    from console.serve import ConsoleServer

    cli = _cli()
    app = create_app({"SAGA_ENGINE": cli.engine()} if cli is not None else None)
    server = ConsoleServer(app, host, port)
    click.echo(f"Saga console on {server.url}  (Ctrl-C stops it)")
    services = app.extensions["saga"]
    if not services.engine.registry.names():
        click.echo(
            "No saga modules named (-A/--app or SAGA_APP): the console shows sagas "
            "but offers no actions on them.",
            err=True,
        )
    if services.users.count() == 0:
        click.echo("No users yet: create one with `saga user add NAME --role admin`.", err=True)
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        server.server.server_close()


@click.group("user")
def user_group() -> None:
    """Manage console users (kept in the store, passwords hashed)."""


@user_group.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default=Role.VIEWER.value,
    show_default=True,
    help="viewer reads; operator also acts on sagas; admin also manages users.",
)
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="Prompted for when not given (the prompt keeps it out of shell history).",
)
def add_user(name: str, role: str, password: str) -> None:
    """Create console user NAME."""
    user = _run(lambda users: users.add(name, password, role, created_by=_cli_actor()))
    click.echo(f"added {user.name} ({user.role})")


@user_group.command("list")
def list_users() -> None:
    """List console users."""
    for user in _run(lambda users: users.list_users()):
        status = "disabled" if user.disabled else "active"
        click.echo(f"{user.name}\t{user.role}\t{status}")


@user_group.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(ROLES))
def set_role(name: str, role: str) -> None:
    """Change the role of console user NAME."""
    user = _run(lambda users: users.set_role(name, role, actor=_cli_actor()))
    click.echo(f"{user.name} is now {user.role}")


@user_group.command("disable")
@click.argument("name")
@click.option("--enable", is_flag=True, help="Enable the user again instead.")
def disable(name: str, enable: bool) -> None:
    """Disable console user NAME (their sessions end at their next request)."""
    user = _run(lambda users: users.set_disabled(name, not enable, actor=_cli_actor()))
    click.echo(f"{user.name} is {'disabled' if user.disabled else 'enabled'}")


def _cli_actor() -> str:
    """Who changes users from the command line, for the record: the shell's user."""
    return f"cli:{os.environ.get('USER') or 'unknown'}"


def _cli() -> Cli | None:
    """The ``saga`` group's state (settings, ``-A`` modules), when run under it."""
    from engine.cli import Cli

    context = click.get_current_context(silent=True)
    return context.find_object(Cli) if context is not None else None


def _run(op: Callable[[UserStore], T]) -> T:
    cli = _cli()
    # Under `saga`, its store checks the schema is migrated and says what to run if not.
    store = (
        cli.store()
        if cli is not None
        else open_store(Settings.from_env().database_url, pool_size=1)
    )
    try:
        return op(UserStore(store.db))
    except InvalidInput as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if cli is None:
            store.dispose()


#: The user ``saga demo`` creates; no other command creates a user by itself.
DEMO_ADMIN = "demo-admin"


def serve_demo_console(engine: SagaEngine, host: str, port: int) -> ConsoleServer:
    """Serve the console beside ``saga demo`` and print where, and the password, once."""
    try:
        server, password = start_demo_console(engine, host, port)
    except OSError as exc:
        if port == 0:
            raise click.ClickException(f"cannot serve the console on {host}: {exc}") from exc
        click.echo(f"console: port {port} is taken ({exc.strerror}); using a free one")
        server, password = start_demo_console(engine, host, 0)
    click.echo(f"console: {server.url}  sign in as {DEMO_ADMIN} / {password}")
    click.echo("         (this password is printed once; the next `saga demo` makes a new one)")
    return server


def start_demo_console(engine: SagaEngine, host: str, port: int) -> tuple[ConsoleServer, str]:
    """Serve the console on ``engine`` in a thread, with a fresh demo admin password.

    The password is generated for this run (an existing demo admin gets a new
    one), returned once for the caller to print, and stored only as a hash.
    """
    from console import create_app
    from console.serve import ConsoleServer

    users = UserStore(engine.store.db)
    password = secrets.token_urlsafe(12)
    if users.by_name(DEMO_ADMIN) is None:
        users.add(DEMO_ADMIN, password, Role.ADMIN, created_by="saga demo")
    else:
        users.set_password(DEMO_ADMIN, password, actor="saga demo")
        users.set_disabled(DEMO_ADMIN, False, actor="saga demo")
    # The demo's process restarts with a new key anyway; no need to warn about it.
    config = {"SAGA_ENGINE": engine, "SECRET_KEY": secrets.token_hex(32)}
    server = ConsoleServer(create_app(config), host, port, access_log=False)
    return server.start(), password
