"""The ``saga`` command: migrate the store, run workers, start, inspect and repair sagas.

Every subcommand reads its settings from ``SAGA_*`` variables (see the
README) and the modules that define sagas from ``-A/--app`` or ``SAGA_APP``.
Output for people goes to standard output; ``--json`` prints one stable,
versioned document instead (docs/cli.md). Errors are one line on standard
error, and nothing is written when a command fails. Exit codes:

===  =============================================================
0    success
1    the store is unreachable or not migrated, or an unexpected error
2    usage error or bad input (payload, option value, reason, module)
3    not found: no saga of that name, or no instance with that id
4    conflict: the state does not allow the operation, or the instance
     changed since ``--expected-version``
===  =============================================================
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import click
import sqlalchemy as sa

from engine import logs
from engine.definition import Saga
from engine.errors import (
    ConcurrencyConflict,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    SagaError,
    SagaNotFound,
    UnknownSaga,
)
from engine.interventions import Action, allowed_actions
from engine.loader import App, load_app, split_names
from engine.model import Instance, StepState, now_ms
from engine.queries import InstanceFilter, Queries
from engine.registry import Registry
from engine.runtime import SagaEngine
from engine.settings import Settings
from engine.states import Phase, SagaState
from engine.store import Store, migrate, open_store

if TYPE_CHECKING:
    from engine.choreography.runtime import EventRuntime
    from engine.sweeper.scheduler import Sweeper

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4

#: Bumped when a ``--json`` document changes incompatibly (docs/cli.md).
JSON_SCHEMA_VERSION = 1

log = logging.getLogger(__name__)


# -- errors: mapped to one line and an exit code, here and nowhere else ------


class StoreNotReady(click.ClickException):
    """The store does not exist yet, or its schema is behind the code."""

    exit_code = EXIT_ERROR


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error a command raised."""
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    if isinstance(exc, (InvalidInput, DefinitionError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, (UnknownSaga, SagaNotFound)):
        return EXIT_NOT_FOUND
    if isinstance(exc, (InvalidTransition, ConcurrencyConflict)):
        return EXIT_CONFLICT
    return EXIT_ERROR


def error_message(exc: BaseException) -> str:
    """One line that says what was wrong."""
    if isinstance(exc, click.ClickException):
        text = exc.format_message()
    elif isinstance(exc, sa.exc.DBAPIError):
        text = f"the store failed: {str(exc.orig).strip() or type(exc.orig).__name__}"
    else:
        text = str(exc)
    return " ".join(text.split())


class SagaGroup(click.Group):
    """A click group whose errors, usage errors included, are one line on stderr."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.ClickException, SagaError, sa.exc.DBAPIError) as exc:
            if not standalone_mode:
                raise
            if isinstance(exc, click.ClickException) and isinstance(exc, _NO_ARGS_IS_HELP):
                # `saga` alone: print the help as it is, not squeezed onto one line.
                click.echo(exc.format_message(), err=True)
                sys.exit(EXIT_BAD_INPUT)
            _fail(error_message(exc), exit_code_for(exc))
        except click.Abort:
            if not standalone_mode:
                raise
            _fail("aborted", EXIT_ERROR)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else EXIT_OK)


# click 8.2+ raises this for a group called without a command; older versions exit 0.
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    t for t in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if t is not None
)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"saga: error: {message}", err=True)
    sys.exit(code)


# -- the state every command shares -------------------------------------------


@dataclass
class Cli:
    """Settings, the ``-A`` modules, and what commands build from them, once each."""

    settings: Settings
    app_names: tuple[str, ...]
    _app: App | None = None
    _store: Store | None = None
    _engine: SagaEngine | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.settings.database_url

    def app(self) -> App:
        if self._app is None:
            self._app = load_app(self.app_names)
        return self._app

    def registry(self) -> Registry:
        return Registry(self.app().sagas)

    def store(self) -> Store:
        """The store, after checking it exists and is migrated (never creates it)."""
        if self._engine is not None:
            return self._engine.store
        if self._store is None:
            require_store(self.url)
            self._store = open_store(self.url, pool_size=2)
            self._closers.append(self._store.dispose)
        return self._store

    def engine(self) -> SagaEngine:
        """An engine with the ``-A`` sagas registered (hooks are for commands that run steps)."""
        if self._engine is None:
            app = self.app()
            require_store(self.url)
            self._engine = SagaEngine(app.sagas, settings=self.settings)
            self._closers.append(self._engine.close)
        return self._engine

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


def require_store(url: str) -> None:
    """Refuse to go on, without creating anything, unless the store is at the newest schema."""
    check_url(url)
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        raise StoreNotReady(f"no store at {path}; create it with `saga db upgrade`")
    revision, head = migrate.current(url), _head(url)
    if revision is None:
        raise StoreNotReady(f"the store at {_safe(url)} has no saga tables; run `saga db upgrade`")
    if revision == head:
        return
    if not _known_revision(url, revision):
        # Migrations only add: a store upgraded by a newer release still works
        # with this one, which lets a rolling deploy upgrade the schema first.
        log.warning(
            "the store at %s is at schema %s, newer than this code's %s; going on",
            _safe(url),
            revision,
            head,
        )
        return
    raise StoreNotReady(
        f"the store at {_safe(url)} is at schema {revision}, this code needs {head}; "
        "run `saga db upgrade`"
    )


def check_url(url: str) -> None:
    """InvalidInput unless ``url`` names a SQLite or PostgreSQL database."""
    try:
        backend = sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError:
        backend = ""
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise InvalidInput(
            "SAGA_DATABASE_URL",
            f"{_safe_or_raw(url)!r} is neither sqlite:///PATH nor postgresql://...",
        )


def _safe_or_raw(url: str) -> str:
    try:
        return _safe(url)
    except sa.exc.ArgumentError:
        return url


def _head(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()


def _known_revision(url: str, revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        ScriptDirectory.from_config(migrate.alembic_config(url)).get_revision(revision)
    except CommandError:
        return False
    return True


def _sqlite_path(url: str) -> Path | None:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database or "")


def _safe(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


pass_cli = click.make_pass_decorator(Cli)


# -- the command group ---------------------------------------------------------


@click.group(cls=SagaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    "apps",
    multiple=True,
    metavar="MODULE",
    help="Module whose Saga objects to register; repeat or separate with commas "
    "(default: $SAGA_APP).",
)
@click.pass_context
def main(ctx: click.Context, apps: tuple[str, ...]) -> None:
    """Run and operate durable sagas. Settings come from SAGA_* variables (see the README)."""
    settings = Settings.from_env()
    handler = logs.configure(settings.log_format, settings.log_level)
    cli = Cli(settings, split_names(apps) or settings.app)
    ctx.obj = cli
    ctx.call_on_close(cli.close)
    # Leave the root logger as found, for callers that run commands in-process.
    ctx.call_on_close(lambda: logging.getLogger().removeHandler(handler))


@main.group()
def db() -> None:
    """The store's schema."""


@db.command("upgrade")
@pass_cli
def db_upgrade(cli: Cli) -> None:
    """Create the store, or bring its schema up to date (SAGA_DATABASE_URL)."""
    check_url(cli.url)
    migrate.upgrade(cli.url)
    click.echo(f"store {_safe(cli.url)} is at schema {migrate.current(cli.url)}")


@db.command("current")
@pass_cli
def db_current(cli: Cli) -> None:
    """Print the store's schema revision ("none" before `saga db upgrade`)."""
    check_url(cli.url)
    path = _sqlite_path(cli.url)
    revision = None if path is not None and not path.exists() else migrate.current(cli.url)
    head = _head(cli.url)
    note = "" if revision == head else f" (newest is {head}; run `saga db upgrade`)"
    click.echo(f"{revision or 'none'}{note}")


@main.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    default=None,
    help="Instances advanced at once (default: $SAGA_CONCURRENCY or 8).",
)
@click.option(
    "--sweeper",
    "with_sweeper",
    is_flag=True,
    help="Also run the sweeps in this process (one sweeper acts at a time across hosts).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Answer Prometheus scrapes at http://0.0.0.0:PORT/metrics.",
)
@pass_cli
def worker(cli: Cli, concurrency: int | None, with_sweeper: bool, metrics_port: int | None) -> None:
    """Run a worker in the foreground until SIGTERM or Ctrl-C, then drain and exit 0."""
    engine = cli.engine()
    _serve_metrics(cli, metrics_port, store_gauges=with_sweeper)
    cli.app().init(engine)  # the modules' init_engine hooks: steps run in this process
    names = engine.registry.names()
    if not names:
        raise InvalidInput(
            "--app", "no sagas to run; name the modules that define them with -A/--app or SAGA_APP"
        )
    running = engine.worker(concurrency)
    click.echo(
        f"worker {engine.owner}: {', '.join(names)} on {_safe(cli.url)}, "
        f"concurrency {running.concurrency}; Ctrl-C to stop",
        err=True,
    )
    stop = threading.Event()
    with stop_on_signals(stop):
        running.start()
        if with_sweeper:
            cli._closers.append(_sweeper(engine).start().stop)
        while not stop.wait(0.5):
            pass
        click.echo("draining: finishing the steps in hand (Ctrl-C again to quit now)", err=True)
        if not running.stop():
            click.echo(
                "some steps were still running; their leases expire and another "
                "worker takes them over",
                err=True,
            )


@main.command()
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Answer Prometheus scrapes at http://0.0.0.0:PORT/metrics.",
)
@click.option("--once", is_flag=True, help="Run every sweep once, print what each did, exit.")
@pass_cli
def sweeper(cli: Cli, metrics_port: int | None, once: bool) -> None:
    """Run the sweeps on their schedule until SIGTERM or Ctrl-C.

    Any number may run: one (holding a PostgreSQL advisory lock, or a file lock
    beside a SQLite store) sweeps, the others stand by and take over if it stops.
    """
    engine = cli.engine()
    running = _sweeper(engine)
    if once:
        done = running.run_once()
        running.stop()
        click.echo(json.dumps(done) if done is not None else "another sweeper leads; did nothing")
        return
    _serve_metrics(cli, metrics_port, store_gauges=True)
    if not engine.registry.names():
        click.echo(
            "no saga modules named (-A/--app or SAGA_APP): stuck detection and automatic "
            "dead-letter retries need the sagas' definitions",
            err=True,
        )
    click.echo(f"sweeper {engine.owner} on {_safe(cli.url)}; Ctrl-C to stop", err=True)
    stop = threading.Event()
    with stop_on_signals(stop):
        running.run_forever(stop)


def _sweeper(engine: SagaEngine) -> Sweeper:
    return engine.sweeper()


def _serve_metrics(cli: Cli, port: int | None, *, store_gauges: bool) -> None:
    """Answer scrapes on ``port``; with the store gauges where one process should serve them
    (a sweeper), not on every worker."""
    if port is None:
        return
    from engine import metrics

    gauges: list[metrics.StoreCollector] = []
    if store_gauges:
        engine = cli.engine()
        gauges.append(metrics.StoreCollector(engine.store, engine.registry.names))
    server = metrics.serve(port, *gauges)
    cli._closers.append(server.shutdown)
    click.echo(f"metrics on http://0.0.0.0:{server.server_port}/metrics", err=True)


@main.command()
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME",
    help="Serve only this service's commands (repeat for more; default: every service "
    "the modules' handlers name).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    default=None,
    help="Commands handled at once (default: $SAGA_CONCURRENCY or 8).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Answer Prometheus scrapes at http://0.0.0.0:PORT/metrics (the saga_participant_* "
    "series).",
)
@pass_cli
def participant(
    cli: Cli, services: tuple[str, ...], concurrency: int | None, metrics_port: int | None
) -> None:
    """Run participant handlers (-A modules) on commands and domain events from Redis until
    SIGTERM or Ctrl-C."""
    from engine.choreography.handlers import choreographies_in, handlers_in
    from engine.loader import import_module
    from engine.remote.participant import ParticipantRuntime, init_hooks, load_participants
    from engine.transport.redis_streams import RedisBus

    if not cli.settings.redis_url:
        raise InvalidInput(
            "SAGA_REDIS_URL",
            "is not set: a participant process reads its commands from Redis; without "
            "Redis, run participants in the worker's process with engine.participant(...)",
        )
    modules = [import_module(name) for name in cli.app_names]
    if not modules:
        raise InvalidInput("--app", "name the modules that define the handlers with -A/--app")
    requested = split_names(services)
    events = None
    if any(handlers_in(m) or choreographies_in(m) for m in modules):
        events = _event_runtime(cli, modules, requested)
    event_names = {h.service for h in events.services} if events is not None else set()
    only = tuple(s for s in requested if s not in event_names)
    runtime = None
    if events is None or (_has_commands(modules) and (not requested or bool(only))):
        bus = RedisBus.from_settings(cli.settings)
        cli._closers.append(bus.close)
        runtime = ParticipantRuntime(
            load_participants(m for m in modules if events is None or _has_commands([m])),
            bus,
            consumer=cli.settings.worker_id,
            concurrency=concurrency or cli.settings.concurrency,
            only=only,
            settings=cli.settings,
        )
        init_hooks(modules, runtime)
        click.echo(
            f"participant {runtime.consumer}: {', '.join(runtime.services)} on {bus.where}, "
            f"concurrency {runtime.concurrency}; Ctrl-C to stop",
            err=True,
        )
    if events is not None:
        names = ", ".join(s.service for s in events.services)
        click.echo(f"participant {events.consumer}: events for {names}; Ctrl-C to stop", err=True)
    _serve_metrics(cli, metrics_port, store_gauges=False)
    stop = threading.Event()
    with stop_on_signals(stop):
        if runtime is not None:
            runtime.start()
        if events is not None:
            events.start()
        while not stop.wait(0.5):
            pass
        click.echo("draining: finishing the commands and events in hand", err=True)
        drained = events.stop() if events is not None else True
        if (runtime is not None and not runtime.stop()) or not drained:
            click.echo("some were still running; they are delivered again", err=True)


def _has_commands(modules: Sequence[ModuleType]) -> bool:
    from engine.remote.participant import participants_in

    return any(participants_in(m) for m in modules)


def _event_runtime(cli: Cli, modules: Sequence[ModuleType], only: Sequence[str]) -> EventRuntime:
    """The domain-event handlers (and the choreography tracker) the modules define."""
    from engine.choreography.runtime import EventRuntime, event_services
    from engine.store import open_store
    from engine.transport.event_log import RedisEventLog

    store = open_store(cli.settings.database_url)
    cli._closers.append(store.dispose)
    services, _ = event_services(modules, store)
    offered = {s.service for s in services}
    chosen = [s for s in services if s.service in only] if only else services
    if only and not chosen and not _has_commands(modules):
        raise InvalidInput(
            "--service",
            f"no handlers for {', '.join(only)}; these have: {', '.join(sorted(offered))}",
        )
    log_ = RedisEventLog.from_settings(cli.settings)
    cli._closers.append(log_.close)
    return EventRuntime(chosen, log_, store, consumer=cli.settings.worker_id)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM or SIGINT sets ``stop``; a second one exits at once (130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(130)  # the operator insists: no drain, leases expire
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@main.command()
@click.argument("name")
@click.option(
    "--payload",
    default="{}",
    show_default=True,
    metavar="JSON",
    help="The instance's input, as JSON text, or @FILE to read it from a file.",
)
@click.option("--correlation-id", help="Ties the instance to a request (default: generated).")
@click.option("--business-key", help="A domain key to find it by, e.g. an order number.")
@click.option(
    "--idempotency-key", help="Starting again with the same key returns the same instance."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def start(
    cli: Cli,
    *,
    name: str,
    payload: str,
    correlation_id: str | None,
    business_key: str | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Start an instance of saga NAME; a worker runs it."""
    data = parse_payload(payload)
    started = cli.engine().start(
        name,
        data,
        correlation_id=correlation_id,
        business_key=business_key,
        idempotency_key=idempotency_key,
    )
    inst = started.instance
    if as_json:
        _print_json({"created": started.created, "instance": instance_json(inst)})
        return
    verb = "started" if started.created else "already started (same idempotency key)"
    click.echo(f"{verb}: {inst.id} ({inst.saga_name} v{inst.saga_version}, {inst.state})")
    click.echo(f"  correlation id: {inst.correlation_id}")
    if inst.business_key:
        click.echo(f"  business key:   {inst.business_key}")
    click.echo(f"  see it with:    saga show {inst.id}")


def parse_payload(text: str, option: str = "--payload") -> Any:
    """JSON text, or the JSON in the file ``@PATH``; InvalidInput when it is neither."""
    source = option
    if text.startswith("@"):
        source = f"{option} file {text[1:]!r}"
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(option, f"cannot read {text[1:]!r}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            source, f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc


@main.command("signal")
@click.argument("saga_id")
@click.argument("event")
@click.option(
    "--data",
    default="null",
    show_default=True,
    metavar="JSON",
    help="What the event carries (the waiting step's output), as JSON text or @FILE.",
)
@click.option(
    "--sent-by",
    default=lambda: os.environ.get("USER") or "cli",
    show_default="$USER or 'cli'",
    help="Who sends it, for the timeline.",
)
@click.option(
    "--reason",
    default=None,
    help="Why a person sends it: then the audit log records it as SENT_BY's action.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def signal_(
    cli: Cli,
    *,
    saga_id: str,
    event: str,
    data: str,
    sent_by: str,
    reason: str | None,
    as_json: bool,
) -> None:
    """Deliver EVENT to saga SAGA_ID, for the step that waits for it (now or later)."""
    delivered = cli.engine().signal(
        saga_id, event, parse_payload(data, "--data"), sent_by=sent_by, reason=reason
    )
    inst = delivered.instance
    if as_json:
        _print_json({"event": event, "taken": delivered.taken, "instance": instance_json(inst)})
        return
    if delivered.taken:
        click.echo(
            f"{event}: taken by saga {inst.id}, now {inst.state} at step {inst.current.name!r}"
        )
    else:
        click.echo(f"{event}: stored for saga {inst.id}; its step takes it when it begins waiting")


@main.command("list")
@click.option("--state", help=f"Only this state: {', '.join(SagaState)}.")
@click.option("--saga", "saga_name", metavar="NAME", help="Only instances of this saga.")
@click.option("--search", metavar="TEXT", help="A saga id, correlation id or business key.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows per page (1-500).")
@click.option("--cursor", help="The next_cursor a previous page printed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def list_(
    cli: Cli,
    *,
    state: str | None,
    saga_name: str | None,
    search: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List instances, newest first."""
    flt = InstanceFilter(state=parse_state(state), saga_name=saga_name, search=search)
    page = Queries(cli.store()).list_instances(flt, limit=limit, cursor=cursor)
    if as_json:
        _print_json(
            {"instances": [i.to_json() for i in page.items], "next_cursor": page.next_cursor}
        )
        return
    rows = [
        (
            i.id,
            f"{i.saga_name} v{i.saga_version}",
            i.state,
            f"{i.current_step + 1}/{i.step_count} {i.current_step_name or ''}",
            i.business_key or "-",
            _ago(i.updated_at),
        )
        for i in page.items
    ]
    _print_table(("ID", "SAGA", "STATE", "STEP", "BUSINESS KEY", "UPDATED"), rows)
    if not rows:
        click.echo("no instances match")
    if page.next_cursor:
        click.echo(f"more: add --cursor {page.next_cursor}")


def parse_state(value: str | None) -> SagaState | None:
    if value is None:
        return None
    try:
        return SagaState(value.strip().lower())
    except ValueError:
        raise InvalidInput(
            "--state", f"{value!r} is not a state; choose one of {', '.join(SagaState)}"
        ) from None


@main.command()
@click.argument("saga_id")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def show(cli: Cli, saga_id: str, as_json: bool) -> None:
    """Show an instance: its steps, timeline, dead letters and operator actions."""
    doc = describe(cli, saga_id)
    if as_json:
        _print_json(doc)
    else:
        render_show(doc)


def describe(cli: Cli, saga_id: str) -> dict[str, Any]:
    """Everything known about one instance, as the ``saga show --json`` document."""
    store = cli.store()
    inst = store.load(saga_id)
    defn = _definition(cli, inst)
    queries = Queries(store)
    keys = [_key(inst.id, s.name, p) for s in inst.steps for p in Phase]
    absorbed = queries.duplicates_absorbed(keys)
    return {
        "instance": instance_json(inst),
        "steps": [step_json(inst, s, defn, absorbed) for s in inst.steps],
        "events": [e.to_json() for e in queries.timeline(inst.id)],
        "dead_letters": [
            d.to_json() for d in reversed(queries.dead_letters(saga_id=inst.id, open_only=False))
        ],
        "operator_actions": [
            a.to_json() for a in reversed(queries.operator_actions(saga_id=inst.id))
        ],
        "allowed_actions": (
            None if defn is None else [str(a) for a in allowed_actions(inst, defn, now_ms())]
        ),
    }


def _definition(cli: Cli, inst: Instance) -> Saga | None:
    # Showing works without -A; only the step kinds and allowed actions need it.
    try:
        return cli.registry().get(inst.saga_name, inst.saga_version)
    except UnknownSaga:
        return None


def instance_json(inst: Instance) -> dict[str, Any]:
    """The ``instance`` object of the JSON documents."""
    return {
        "id": inst.id,
        "saga_name": inst.saga_name,
        "saga_version": inst.saga_version,
        "state": str(inst.state),
        "phase": None if inst.state.is_final else str(inst.phase),
        "current_step": inst.cursor,
        "current_step_name": inst.current.name,
        "step_count": len(inst.steps),
        "payload": inst.payload,
        "correlation_id": inst.correlation_id,
        "business_key": inst.business_key,
        "idempotency_key": inst.idempotency_key,
        "version": inst.version,
        "created_at": inst.created_at,
        "updated_at": inst.updated_at,
        "last_progress_at": inst.last_progress_at,
        "next_run_at": inst.next_run_at,
        "lease_owner": inst.lease_owner,
        "lease_expires_at": inst.lease_expires_at,
    }


def step_json(
    inst: Instance, step: StepState, defn: Saga | None, absorbed: dict[str, int]
) -> dict[str, Any]:
    """One element of ``steps``: the action side and the compensation side."""
    action_key = _key(inst.id, step.name, Phase.ACTION)
    comp_key = _key(inst.id, step.name, Phase.COMPENSATE)
    return {
        "index": step.index,
        "name": step.name,
        "kind": None if defn is None else str(defn.steps[step.index].kind),
        "action": {
            "status": str(step.status),
            "attempts": step.attempts,
            "started_at": step.started_at,
            "finished_at": step.finished_at,
            "deadline_at": step.deadline_at,
            "output": step.output,
            "error": step.error,
            "idempotency_key": action_key,
            "duplicates_absorbed": absorbed.get(action_key, 0),
        },
        "compensation": {
            "status": str(step.comp_status),
            "attempts": step.comp_attempts,
            "started_at": step.comp_started_at,
            "finished_at": step.comp_finished_at,
            "deadline_at": step.comp_deadline_at,
            "error": step.comp_error,
            "idempotency_key": comp_key,
            "duplicates_absorbed": absorbed.get(comp_key, 0),
        },
    }


def _key(saga_id: str, step: str, phase: Phase) -> str:
    return f"{saga_id}:{step}:{phase}"


# -- operator actions ----------------------------------------------------------

_OPERATOR_HELP = {
    Action.RETRY: "Run the failed or waiting step (or compensation) now, with a fresh "
    "retry budget.",
    Action.SKIP: "Mark the current step (or its compensation) done by hand and go on.",
    Action.COMPENSATE: "Stop going forward and compensate every started step, from the "
    "current one.",
    Action.CANCEL: "Stop the instance where it stands; nothing more runs, nothing is undone.",
}


def _operator_command(action: Action) -> click.Command:
    @click.command(name=str(action), help=_OPERATOR_HELP[action])
    @click.argument("saga_id")
    @click.option("--reason", default="", help="Why; required, recorded in the audit log.")
    @click.option(
        "--actor",
        default=lambda: os.environ.get("USER") or "cli",
        show_default="$USER or 'cli'",
        help="Who is acting, for the audit log.",
    )
    @click.option(
        "--expected-version",
        type=int,
        metavar="N",
        help="Refuse if the instance's version is no longer N (from `saga show`).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
    @pass_cli
    def command(
        cli: Cli,
        *,
        saga_id: str,
        reason: str,
        actor: str,
        expected_version: int | None,
        as_json: bool,
    ) -> None:
        inst = cli.engine().operations.act(
            action, saga_id, actor=actor, reason=reason, expected_version=expected_version
        )
        if as_json:
            _print_json({"action": str(action), "instance": instance_json(inst)})
            return
        click.echo(
            f"{action}: saga {inst.id} is now {inst.state} at step "
            f"{inst.current.name!r} (version {inst.version}); recorded as {actor}"
        )

    return command


for _action in Action:
    main.add_command(_operator_command(_action))


# -- dead letters and bulk recovery --------------------------------------------


@main.command("deadletters")
@click.option("--saga", "saga_name", metavar="NAME", help="Only dead letters of this saga.")
@click.option("--step", "step_name", metavar="NAME", help="Only those failing at this step.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows per page (1-500).")
@click.option("--cursor", help="The next_cursor a previous page printed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def deadletters(
    cli: Cli,
    *,
    saga_name: str | None,
    step_name: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List dead-lettered instances: failing step, error, first and last failure, attempts."""
    page = Queries(cli.store()).dead_lettered(
        saga_name=saga_name, step_name=step_name, limit=limit, before=cursor
    )
    if as_json:
        _print_json(
            {"dead_letters": [d.to_json() for d in page.items], "next_cursor": page.next_cursor}
        )
        return
    rows = [
        (
            d.saga_id,
            f"{d.saga_name} v{d.saga_version}",
            f"{d.step_name} ({d.phase})",
            str(d.attempts),
            _when(d.first_failure_at),
            _when(d.last_failure_at),
            _first_line(d.error, 60),
        )
        for d in page.items
    ]
    header = ("ID", "SAGA", "FAILING STEP", "ATTEMPTS", "FIRST FAILURE", "LAST FAILURE", "ERROR")
    _print_table(header, rows)
    if not rows:
        click.echo("no dead letters: nothing waits for an operator")
    if page.next_cursor:
        click.echo(f"more: add --cursor {page.next_cursor}")


def _actor_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--actor",
        default=lambda: os.environ.get("USER") or "cli",
        show_default="$USER or 'cli'",
        help="Who is acting, for the audit log.",
    )(fn)


@main.command("edit-retry")
@click.argument("saga_id")
@click.option(
    "--payload",
    required=True,
    metavar="JSON",
    help="The corrected payload (every step's input), as JSON text or @FILE.",
)
@click.option("--reason", default="", help="Why; required, recorded in the audit log.")
@_actor_option
@click.option("--expected-version", type=int, metavar="N", help="Refuse unless at version N.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def edit_retry(
    cli: Cli,
    *,
    saga_id: str,
    payload: str,
    reason: str,
    actor: str,
    expected_version: int | None,
    as_json: bool,
) -> None:
    """Replace the payload, then retry the failed step now (the audit log keeps both)."""
    inst = cli.engine().operations.edit_and_retry(
        saga_id,
        parse_payload(payload),
        actor=actor,
        reason=reason,
        expected_version=expected_version,
    )
    _print_done("edit_retry", inst, actor, as_json)


@main.command("resolve")
@click.argument("saga_id")
@click.option("--reason", default="", help="Why; required, recorded in the audit log.")
@_actor_option
@click.option("--expected-version", type=int, metavar="N", help="Refuse unless at version N.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def resolve(
    cli: Cli,
    *,
    saga_id: str,
    reason: str,
    actor: str,
    expected_version: int | None,
    as_json: bool,
) -> None:
    """Mark a dead letter resolved by hand: the saga ends cancelled, nothing is undone."""
    inst = cli.engine().operations.resolve(
        saga_id, actor=actor, reason=reason, expected_version=expected_version
    )
    _print_done("resolve", inst, actor, as_json)


def _print_done(action: str, inst: Instance, actor: str, as_json: bool) -> None:
    if as_json:
        _print_json({"action": action, "instance": instance_json(inst)})
        return
    click.echo(
        f"{action}: saga {inst.id} is now {inst.state} at step "
        f"{inst.current.name!r} (version {inst.version}); recorded as {actor}"
    )


@main.group()
def bulk() -> None:
    """Recover many instances at once: dry-run, run, stop, show, list."""


def _filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--saga", "saga_name", metavar="NAME", help="Saga type."),
        click.option("--state", help=f"One of {', '.join(SagaState)}."),
        click.option("--stuck", is_flag=True, help="Only instances flagged stuck."),
        click.option("--step", "step_name", metavar="NAME", help="The current (failing) step."),
        click.option("--error", "error_text", metavar="TEXT", help="Its error contains TEXT."),
        click.option("--from", "time_from", metavar="TIME", help="From this UTC time."),
        click.option("--to", "time_to", metavar="TIME", help="Before this UTC time."),
        click.option(
            "--time-field",
            type=click.Choice(["created", "updated"]),
            default="created",
            show_default=True,
            help="Which time --from/--to apply to.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_ACTION = click.argument("action", type=click.Choice([str(a) for a in Action]))


def _bulk_filter(options: dict[str, Any]) -> Any:
    from engine.bulk.model import BulkFilter

    return BulkFilter(
        saga_name=options["saga_name"],
        state=parse_state(options["state"]),
        stuck=options["stuck"],
        step_name=options["step_name"],
        error_text=options["error_text"],
        time_field=options["time_field"],
        time_from=_parse_time(options["time_from"], "--from"),
        time_to=_parse_time(options["time_to"], "--to"),
    )


def _parse_time(text: str | None, option: str) -> int | None:
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(option, f"{text!r} is not a time; use YYYY-MM-DDTHH:MM (UTC)") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


@bulk.command("dry-run")
@_ACTION
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def bulk_dry_run(cli: Cli, /, action: str, as_json: bool, **options: Any) -> None:
    """Count and sample the instances ACTION would touch; changes nothing."""
    dry = cli.engine().bulk_recovery().dry_run(Action(action), _bulk_filter(options))
    if as_json:
        _print_json(dry.to_json())
        return
    _render_dry_run(dry)


def _render_dry_run(dry: Any) -> None:
    from engine.bulk.model import MAX_ITEMS

    if dry.too_many:
        click.echo(f"matches more than {MAX_ITEMS:,} instances: narrow the filter")
        return
    click.echo(f"{dry.action} would touch {dry.count} instance(s): {dry.selection.describe()}")
    _print_table(
        ("ID", "SAGA", "STATE", "STEP", "APPLIES", "ERROR"),
        [
            (
                s.saga_id,
                f"{s.saga_name} v{s.saga_version}",
                s.state,
                s.step_name,
                "yes" if s.applies else ("?" if s.applies is None else f"no: {s.why_not}"),
                _first_line(s.error, 50),
            )
            for s in dry.sample
        ],
        indent=2,
    )
    if dry.count > len(dry.sample):
        click.echo(f"  ... and {dry.count - len(dry.sample)} more")


@bulk.command("run")
@_ACTION
@_filter_options
@click.option("--reason", default="", help="Why; required, recorded in the audit log.")
@click.option(
    "--expect",
    "expected",
    type=int,
    metavar="N",
    help="The count the dry run showed; without it, the dry run is shown and nothing runs.",
)
@click.option("--batch-size", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option(
    "--rate", type=click.FloatRange(0.1, 1000), default=5.0, show_default=True, help="Items/s."
)
@click.option(
    "--max-failure-rate",
    type=click.FloatRange(0, 100),
    default=20.0,
    show_default=True,
    help="Stop by itself past this % of failed items (judged after 10 items).",
)
@_actor_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def bulk_run(
    cli: Cli,
    /,
    action: str,
    reason: str,
    expected: int | None,
    batch_size: int,
    rate: float,
    max_failure_rate: float,
    actor: str,
    as_json: bool,
    **options: Any,
) -> None:
    """Apply ACTION to every instance the filter matches, in the foreground (Ctrl-C stops)."""
    engine = cli.engine()
    recovery, flt = engine.bulk_recovery(), _bulk_filter(options)
    if expected is None:
        dry = recovery.dry_run(Action(action), flt)
        _render_dry_run(dry)
        raise InvalidInput("--expect", f"confirm the count: run again with --expect {dry.count}")
    op = recovery.create(
        Action(action),
        flt,
        actor=actor,
        reason=reason,
        expected_count=expected,
        batch_size=batch_size,
        rate_per_second=rate,
        max_failure_rate=max_failure_rate / 100,
    )
    if not as_json:
        click.echo(f"bulk operation {op.id}: {op.action} on {op.total} instance(s)")
    done = _follow(recovery, op.id, actor, quiet=as_json)
    if as_json:
        _print_json({"operation": done.to_json()})
        return
    click.echo(f"bulk operation {done.id} {done.status}: {_tally(done)}; {done.note or ''}")


def _follow(recovery: Any, operation_id: str, actor: str, quiet: bool) -> Any:
    """Run the operation in a thread; print progress; Ctrl-C raises its stop flag."""
    thread = recovery.spawn(operation_id)
    stop = threading.Event()
    with stop_on_signals(stop):
        while thread.is_alive():
            thread.join(1.0)
            if stop.is_set() and recovery.get(operation_id).stop_requested_at is None:
                recovery.stop(operation_id, actor)
            if not quiet and thread.is_alive():
                click.echo(f"  {_tally(recovery.get(operation_id))}", err=True)
    return recovery.get(operation_id)


def _tally(op: Any) -> str:
    return (
        f"{op.processed}/{op.total} processed: {op.applied} applied, {op.skipped} skipped, "
        f"{op.errors} errors, {op.failed_again} failed again"
    )


@bulk.command("stop")
@click.argument("operation_id")
@_actor_option
@pass_cli
def bulk_stop(cli: Cli, operation_id: str, actor: str) -> None:
    """Stop a running bulk operation before its next item (from any host)."""
    op = cli.engine().bulk_recovery().stop(operation_id, actor)
    click.echo(f"bulk operation {op.id}: stop requested by {actor}; it is {op.status}")


@bulk.command("show")
@click.argument("operation_id")
@click.option(
    "--outcome", type=click.Choice(["pending", "applied", "skipped", "error", "failed_again"])
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def bulk_show(cli: Cli, operation_id: str, outcome: str | None, as_json: bool) -> None:
    """Show a bulk operation's report: settings, totals, and every item's outcome."""
    from engine.bulk.model import MAX_ITEMS, ItemOutcome
    from engine.store.bulk import BulkStore

    store = BulkStore(cli.store().db)
    op = store.get(operation_id)
    wanted = ItemOutcome(outcome) if outcome else None
    items = store.items(operation_id, outcome=wanted, limit=MAX_ITEMS).items
    if as_json:
        _print_json({"operation": op.to_json(), "items": [i.to_json() for i in items]})
        return
    click.echo(f"bulk operation {op.id}: {op.action} by {op.created_by}, {op.status}")
    click.echo(f"  filter:  {op.selection.describe()}")
    click.echo(f"  reason:  {op.reason}")
    click.echo(f"  totals:  {_tally(op)}")
    if op.note:
        click.echo(f"  note:    {op.note}")
    _print_table(
        ("#", "ID", "BEFORE", "OUTCOME", "AFTER", "NOW", "WHY"),
        [
            (
                str(i.seq),
                i.saga_id,
                i.state_before,
                str(i.outcome),
                i.state_after or "",
                i.state_now or "purged",
                _first_line(i.error, 60),
            )
            for i in items
        ],
        indent=2,
    )


@bulk.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (docs/cli.md).")
@pass_cli
def bulk_list(cli: Cli, as_json: bool) -> None:
    """List recent bulk operations, newest first."""
    from engine.store.bulk import BulkStore

    ops = BulkStore(cli.store().db).recent()
    if as_json:
        _print_json({"operations": [o.to_json() for o in ops]})
        return
    _print_table(
        ("ID", "ACTION", "BY", "STATUS", "CREATED", "PROGRESS"),
        [
            (o.id, str(o.action), o.created_by, str(o.status), _when(o.created_at), _tally(o))
            for o in ops
        ],
    )


def _add_console_commands() -> None:
    # `saga console` and `saga user ...` live with the console, which needs Flask.
    from console.commands import console_command, user_group

    main.add_command(console_command)
    main.add_command(user_group)


_add_console_commands()


@main.command()
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
    type=click.IntRange(1, 1000),
    default=None,
    help="Worker concurrency (default: $SAGA_CONCURRENCY or 8).",
)
@click.option("--seed", type=int, default=None, help="Seed the outcome mix, to repeat a run.")
@click.option(
    "--console/--no-console", default=True, show_default=True, help="Serve the console too."
)
@click.option("--console-host", default="127.0.0.1", show_default=True)
@click.option(
    "--console-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the console; when taken, a free one is used.",
)
@pass_cli
def demo(
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
    from engine import demo as demo_module

    check_url(cli.settings.database_url)
    options = demo_module.DemoOptions(
        rate=rate, duration=duration, concurrency=concurrency, seed=seed
    )
    engine = demo_module.prepare(cli.settings)
    stop = threading.Event()
    server = None
    try:
        if console:
            from console.commands import serve_demo_console

            server = serve_demo_console(engine, console_host, console_port)
        with stop_on_signals(stop):
            demo_module.run_demo(engine, stop, options)
    finally:
        if server is not None:
            server.stop()
        engine.close()


# -- rendering for people --------------------------------------------------------


def render_show(doc: dict[str, Any]) -> None:
    inst = doc["instance"]
    allowed = doc["allowed_actions"]
    click.echo(
        f"saga {inst['id']}  {inst['saga_name']} v{inst['saga_version']}  "
        f"{inst['state']}  (version {inst['version']})"
    )
    for label, value in (
        ("correlation id", inst["correlation_id"]),
        ("business key", inst["business_key"]),
        ("idempotency key", inst["idempotency_key"]),
        ("created", _when(inst["created_at"])),
        ("last progress", _when(inst["last_progress_at"])),
        ("next run", _when(inst["next_run_at"])),
        (
            "lease",
            inst["lease_owner"]
            and f"{inst['lease_owner']} until {_when(inst['lease_expires_at'])}",
        ),
        ("payload", json.dumps(inst["payload"])),
        (
            "actions",
            "(register the saga with -A to see them)"
            if allowed is None
            else ", ".join(allowed) or "none: it has finished",
        ),
    ):
        if value:
            click.echo(f"  {label + ':':<17}{value}")
    click.echo("\nsteps")
    _print_table(
        ("#", "STEP", "KIND", "ACTION", "COMPENSATION"),
        [
            (
                str(s["index"]),
                s["name"],
                s["kind"] or "?",
                _side(s["action"]),
                _side(s["compensation"]),
            )
            for s in doc["steps"]
        ],
        indent=2,
    )
    click.echo("\ntimeline")
    _print_table(
        ("TIME", "EVENT", "STEP", "ATTEMPT", "ACTOR", "ERROR"),
        [
            (
                _clock(e["at"]),
                e["kind"],
                _step_label(e),
                str(e["attempt"] or ""),
                e["actor"],
                _first_line(e["error"]),
            )
            for e in doc["events"]
        ],
        indent=2,
    )
    _render_records(doc)


def _render_records(doc: dict[str, Any]) -> None:
    if doc["dead_letters"]:
        click.echo("\ndead letters")
        for d in doc["dead_letters"]:
            state = (
                f"resolved by {d['resolved_by']} ({d['resolution']})"
                if d["resolved_at"]
                else "open"
            )
            click.echo(
                f"  {_when(d['created_at'])}  {d['step_name']} {d['phase']} after "
                f"{d['attempts']} attempts: {_first_line(d['error'])}  [{state}]"
            )
    if doc["operator_actions"]:
        click.echo("\noperator actions")
        for a in doc["operator_actions"]:
            click.echo(
                f"  {_when(a['at'])}  {a['actor']} {a['action']} at {a['step_name']}: "
                f"{a['state_before']} -> {a['state_after']}  reason: {a['reason']}"
            )


def _side(side: dict[str, Any]) -> str:
    text = str(side["status"])
    if side["attempts"]:
        text += f" ({side['attempts']} attempt{'s' if side['attempts'] != 1 else ''})"
    if side["error"] and side["status"] not in ("succeeded", "compensated"):
        text += f": {_first_line(side['error'], 60)}"
    return text


def _step_label(event: dict[str, Any]) -> str:
    if event["step_name"] is None:
        return ""
    return f"{event['step_name']} {event['phase'] or ''}".strip()


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: int = 0) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=True)]
        click.echo((" " * indent + "  ".join(cells)).rstrip())


def _print_json(doc: dict[str, Any]) -> None:
    click.echo(json.dumps({"schema_version": JSON_SCHEMA_VERSION, **doc}, indent=2))


def _when(ms: int | None) -> str:
    if ms is None:
        return ""
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + f".{ms % 1000:03d}Z"


def _clock(ms: int) -> str:
    return _when(ms)[11:]


def _ago(ms: int) -> str:
    seconds = max(now_ms() - ms, 0) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _first_line(text: str | None, width: int = 80) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"
