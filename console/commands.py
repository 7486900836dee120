"""The console's commands: ``saga console``, ``saga user
add|list|set-role|set-password|disable`` and ``saga demo`` (the engine's demo
with the console beside it).

:mod:`console.cli` adds them to the engine's ``saga`` group; under it they
use its settings and ``-A`` modules, and run on their own (tests) they read
the same ``SAGA_*`` variables.
"""

from __future__ import annotations

import secrets
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import click

from console import create_app
from console.serve import ConsoleServer
from console.services import Services
from engine.cli.context import Cli, check_url, pass_cli, shell_origin
from engine.cli.errors import EXIT_NOT_FOUND, BadInput
from engine.cli.params import Text, WholeNumber
from engine.cli.processes import stop_on_signals
from engine.demo import DemoOptions, prepare, run_demo
from engine.display import visible
from engine.errors import InvalidInput, UnknownUser
from engine.inputs import MAX_BIGINT, check_filter
from engine.runtime import SagaEngine
from engine.settings import Settings
from engine.store import open_store
from engine.users import MAX_PASSWORD, Role, UserStore

ROLES = [r.value for r in Role]
T = TypeVar("T")


#: The production command of docs/deploying.md, with its options.
PRODUCTION_COMMAND = "gunicorn -w 4 -b 0.0.0.0:8000 --graceful-timeout 30 'console:create_app()'"

#: What ``saga console`` says as it starts: it is not the server to run in production.
DEVELOPMENT_SERVER_NOTE = (
    "This is the development server, for one machine. In production run (docs/deploying.md):\n"
    f"  {PRODUCTION_COMMAND}"
)


@click.command("console")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=WholeNumber(0, 65535),
    help="Port to listen on (0 picks a free one).",
)
def console_command(host: str, port: int) -> None:
    """Serve the operator console (for production use gunicorn 'console:create_app()')."""
    cli = _cli()
    app = create_app({"SAGA_ENGINE": cli.engine()} if cli is not None else None)
    server = ConsoleServer(app, host, port)
    click.echo(f"Saga console on {server.url}  (Ctrl-C stops it)")
    click.echo(DEVELOPMENT_SERVER_NOTE, err=True)
    _say_what_is_missing(app.extensions["saga"])
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        server.server.server_close()


def _say_what_is_missing(services: Services) -> None:
    """What the console cannot do yet, and how to fix it."""
    if not services.engine.registry.names():
        click.echo(
            "No saga modules named (-A/--app or SAGA_APP): the console shows sagas "
            "but offers no actions on them.",
            err=True,
        )
    if services.users.count() == 0:
        click.echo("No users yet: create one with `saga user add NAME --role admin`.", err=True)


#: The longest console user name, in the users' rules (engine.users) and the table.
USER_NAME = Text(150)


@click.group("user")
def user_group() -> None:
    """Manage console users (kept in the store, passwords hashed)."""


@user_group.command("add")
@click.argument("name", type=USER_NAME)
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default=Role.VIEWER.value,
    show_default=True,
    help="viewer reads; operator also acts on sagas; admin also manages users.",
)
@click.option(
    "--password",
    type=Text(MAX_PASSWORD),  # a password the hash can encode: no lone surrogate
    default=None,
    help="The password (it lands in shell history: prefer the prompt or --password-stdin).",
)
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
def add_user(name: str, role: str, password: str | None, password_stdin: bool) -> None:
    """Create console user NAME (the password is prompted for twice, not echoed)."""
    password = _password(password, password_stdin)
    user = _run(lambda users: users.add(name, password, role, created_by=_cli_actor()))
    click.echo(f"added {user.name} ({user.role})")


@user_group.command("set-password")
@click.argument("name", type=USER_NAME)
@click.option(
    "--password-stdin", is_flag=True, help="Read the new password from the first line of stdin."
)
def set_password(name: str, password_stdin: bool) -> None:
    """Give console user NAME a new password; every session of theirs ends.

    Prompted for twice and never echoed, unless --password-stdin. A forced
    reset is cleared: the user signs in with this password.
    """
    password = _password(None, password_stdin)
    user = _run(lambda users: users.set_password(name, password, actor=_cli_actor()))
    click.echo(f"{user.name} has a new password; their sessions have ended")


@user_group.command("list")
def list_users() -> None:
    """List console users."""
    for user in _run(lambda users: users.list_users()):
        status = "disabled" if user.disabled else "active"
        # Tab-separated for scripts; a name's own control characters are shown escaped.
        click.echo("\t".join(visible(field) for field in (user.name, user.role, status)))


@user_group.command("set-role")
@click.argument("name", type=USER_NAME)
@click.argument("role", type=click.Choice(ROLES))
def set_role(name: str, role: str) -> None:
    """Change the role of console user NAME."""
    user = _run(lambda users: users.set_role(name, role, actor=_cli_actor()))
    click.echo(f"{user.name} is now {user.role}")


@user_group.command("disable")
@click.argument("name", type=USER_NAME)
@click.option("--enable", is_flag=True, help="Enable the user again instead.")
def disable(name: str, enable: bool) -> None:
    """Disable console user NAME (every session of theirs ends at once)."""
    user = _run(lambda users: users.set_disabled(name, not enable, actor=_cli_actor()))
    click.echo(f"{user.name} is {'disabled' if user.disabled else 'enabled'}")


def _password(given: str | None, from_stdin: bool) -> str:
    """The password: given as an option, the first line of stdin, or prompted for twice."""
    if given is not None and from_stdin:
        raise click.UsageError("give --password or --password-stdin, not both")
    if given is not None:
        return given
    if from_stdin:
        typed = sys.stdin.readline().rstrip("\r\n")
        return check_filter("password", typed, limit=MAX_PASSWORD) or ""
    # The same checks as --password: a typed password the hash could not encode is
    # refused here, and asked for again.
    prompted = click.prompt(
        "Password", hide_input=True, confirmation_prompt=True, type=Text(MAX_PASSWORD)
    )
    return str(prompted)


def _cli_actor() -> str:
    """Who changes users from the command line, for the record: the OS user and host of
    this process (not $USER, which anyone can set), as every CLI action records them."""
    return f"cli:{shell_origin().detail or 'unknown'}"


def _cli() -> Cli | None:
    """The ``saga`` group's state (settings, ``-A`` modules), when run under it."""
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
        refused = _NoSuchUser if isinstance(exc, UnknownUser) else BadInput
        raise refused(str(exc)) from exc  # exit 3 or 2, as everywhere: not unexpected
    finally:
        if cli is None:
            store.dispose()


class _NoSuchUser(click.ClickException):
    """No user of that name: exit 3 ("not found"), as docs/cli.md says."""

    exit_code = EXIT_NOT_FOUND


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


@click.command("demo")
@click.option(
    "--rate",
    type=click.FloatRange(0.1, 100.0),
    default=3.0,
    show_default=True,
    help="Sagas started per second.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Stop after this many seconds (default: run until Ctrl-C).",
)
@click.option(
    "--concurrency",
    type=WholeNumber(1, 1000),
    default=None,
    help="Worker concurrency (default: $SAGA_CONCURRENCY or 8).",
)
@click.option(
    "--seed",
    type=WholeNumber(-MAX_BIGINT, MAX_BIGINT),
    default=None,
    help="Seed the outcome mix, to repeat a run.",
)
@click.option(
    "--console/--no-console", default=True, show_default=True, help="Serve the console too."
)
@click.option("--console-host", default="127.0.0.1", show_default=True)
@click.option(
    "--console-port",
    type=WholeNumber(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the console; when taken, a free one is used.",
)
@pass_cli
def demo_command(
    cli: Cli,
    *,
    rate: float,
    duration: float | None,
    concurrency: int | None,
    seed: int | None,
    console: bool,
    console_host: str,
    console_port: int,
) -> None:
    """Run the example sagas continuously on this machine, with a realistic mix of outcomes."""
    check_url(cli.settings.database_url)
    options = DemoOptions(rate=rate, duration=duration, concurrency=concurrency, seed=seed)
    engine = prepare(cli.settings)
    stop = threading.Event()
    server = None
    try:
        if console:
            server = serve_demo_console(engine, console_host, console_port)
        with stop_on_signals(stop):
            run_demo(engine, stop, options)
    finally:
        if server is not None:
            server.stop()
        engine.close()
