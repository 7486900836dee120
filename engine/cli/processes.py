"""The long-running commands: ``saga worker``, ``saga sweeper`` and ``saga participant``.

Each runs in the foreground until SIGTERM or Ctrl-C, then drains: what is in
hand finishes, and anything that cannot is left to the leases (the store) or
to redelivery (Redis), so stopping a process never loses work.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType, ModuleType

import click

from engine import metrics
from engine.choreography.handlers import choreographies_in, handlers_in
from engine.choreography.runtime import EventRuntime, event_services
from engine.choreography.runtime import init_hooks as init_event_hooks
from engine.cli.context import Cli, pass_cli
from engine.cli.params import WholeNumber
from engine.errors import InvalidInput
from engine.loader import import_module, split_names
from engine.remote.participant import (
    ParticipantRuntime,
    init_hooks,
    load_participants,
    participants_in,
)
from engine.store import open_store, redacted
from engine.sweeper.scheduler import Sweeper
from engine.transport.event_log import RedisEventLog
from engine.transport.redis_streams import RedisStreams

_METRICS_HELP = "Answer Prometheus scrapes at http://0.0.0.0:PORT/metrics."


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM or SIGINT sets ``stop``; a second one exits at once (130)."""
    # Only the main thread may set signal handlers (commands run in threads under tests).
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


def wait_for(stop: threading.Event) -> None:
    """Block until ``stop`` is set."""
    # In short waits rather than one: the signal handler runs between them.
    while not stop.wait(0.5):
        pass


def serve_metrics(cli: Cli, port: int | None, *, store_gauges: bool) -> None:
    """Answer scrapes on ``port``; with the store gauges where one process should serve them
    (a sweeper), not on every worker."""
    if port is None:
        return
    gauges: list[metrics.StoreCollector] = []
    if store_gauges:
        engine = cli.engine()
        gauges.append(metrics.StoreCollector(engine.store, engine.registry.names))
    server = metrics.serve(port, *gauges)
    cli.on_close(server.shutdown)
    click.echo(f"metrics on http://0.0.0.0:{server.server_port}/metrics", err=True)


# -- saga worker -------------------------------------------------------------------


@click.command("worker")
@click.option(
    "--concurrency",
    type=WholeNumber(1, 1000),
    default=None,
    help="Instances advanced at once (default: $SAGA_CONCURRENCY or 8).",
)
@click.option(
    "--sweeper",
    "with_sweeper",
    is_flag=True,
    help="Also run the sweeps in this process (one sweeper acts at a time across hosts).",
)
@click.option("--metrics-port", type=WholeNumber(0, 65535), default=None, help=_METRICS_HELP)
@pass_cli
def worker(cli: Cli, concurrency: int | None, with_sweeper: bool, metrics_port: int | None) -> None:
    """Run a worker in the foreground until SIGTERM or Ctrl-C, then drain and exit 0."""
    engine = cli.engine()
    serve_metrics(cli, metrics_port, store_gauges=with_sweeper)
    cli.app().init(engine)  # the modules' init_engine hooks: steps run in this process
    names = engine.registry.names()
    if not names:
        raise InvalidInput(
            "--app", "no sagas to run; name the modules that define them with -A/--app or SAGA_APP"
        )
    running = engine.worker(concurrency)
    click.echo(
        f"worker {engine.owner}: {', '.join(names)} on {redacted(cli.url)}, "
        f"concurrency {running.concurrency}; Ctrl-C to stop",
        err=True,
    )
    stop = threading.Event()
    with stop_on_signals(stop):
        running.start()
        if with_sweeper:
            cli.on_close(engine.sweeper().start().stop)
        wait_for(stop)
        click.echo("draining: finishing the steps in hand (Ctrl-C again to quit now)", err=True)
        if not running.stop():
            click.echo(
                "some steps were still running; their leases expire and another "
                "worker takes them over",
                err=True,
            )


# -- saga sweeper ------------------------------------------------------------------


@click.command("sweeper")
@click.option("--metrics-port", type=WholeNumber(0, 65535), default=None, help=_METRICS_HELP)
@click.option("--once", is_flag=True, help="Run every sweep once, print what each did, exit.")
@pass_cli
def sweeper(cli: Cli, metrics_port: int | None, once: bool) -> None:
    """Run the sweeps on their schedule until SIGTERM or Ctrl-C.

    Any number may run: one (holding a PostgreSQL advisory lock, or a file lock
    beside a SQLite store) sweeps, the others stand by and take over if it stops.
    """
    engine = cli.engine()
    running = engine.sweeper()
    if once:
        _sweep_once(running)
        return
    serve_metrics(cli, metrics_port, store_gauges=True)
    if not engine.registry.names():
        click.echo(
            "no saga modules named (-A/--app or SAGA_APP): stuck detection and automatic "
            "dead-letter retries need the sagas' definitions",
            err=True,
        )
    click.echo(f"sweeper {engine.owner} on {redacted(cli.url)}; Ctrl-C to stop", err=True)
    stop = threading.Event()
    with stop_on_signals(stop):
        running.run_forever(stop)


def _sweep_once(running: Sweeper) -> None:
    done = running.run_once()
    running.stop()
    click.echo(json.dumps(done) if done is not None else "another sweeper leads; did nothing")


# -- saga participant --------------------------------------------------------------


@click.command("participant")
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
    type=WholeNumber(1, 1000),
    default=None,
    help="Commands handled at once (default: $SAGA_CONCURRENCY or 8).",
)
@click.option(
    "--metrics-port",
    type=WholeNumber(0, 65535),
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
    modules = _participant_modules(cli)
    requested = split_names(services)
    events = _event_runtime(cli, modules, requested) if _has_event_handlers(modules) else None
    commands = _command_runtime(cli, modules, requested, events, concurrency)
    if events is not None:
        names = ", ".join(s.service for s in events.services)
        click.echo(f"participant {events.consumer}: events for {names}; Ctrl-C to stop", err=True)
    serve_metrics(cli, metrics_port, store_gauges=False)
    _run_participants(commands, events)


def _participant_modules(cli: Cli) -> list[ModuleType]:
    if not cli.settings.redis_url:
        raise InvalidInput(
            "SAGA_REDIS_URL",
            "is not set: a participant process reads its commands from Redis; without "
            "Redis, run participants in the worker's process with engine.participant(...)",
        )
    # Imported as modules, not loaded as an App: a participant's module need not define sagas.
    modules = [import_module(name) for name in cli.app_names]
    if not modules:
        raise InvalidInput("--app", "name the modules that define the handlers with -A/--app")
    return modules


def _has_commands(modules: Sequence[ModuleType]) -> bool:
    return any(participants_in(m) for m in modules)


def _has_event_handlers(modules: Sequence[ModuleType]) -> bool:
    return any(handlers_in(m) or choreographies_in(m) for m in modules)


def _event_runtime(cli: Cli, modules: Sequence[ModuleType], only: Sequence[str]) -> EventRuntime:
    """The domain-event handlers (and the choreography tracker) the modules define."""
    store = open_store(cli.settings.database_url)
    cli.on_close(store.dispose)
    services, _ = event_services(modules, store)
    offered = {s.service for s in services}
    chosen = [s for s in services if s.service in only] if only else services
    if only and not chosen and not _has_commands(modules):
        raise InvalidInput(
            "--service",
            f"no handlers for {', '.join(only)}; these have: {', '.join(sorted(offered))}",
        )
    event_log = RedisEventLog.from_settings(cli.settings)
    cli.on_close(event_log.close)
    runtime = EventRuntime(chosen, event_log, store, consumer=cli.settings.worker_id)
    init_event_hooks(modules, runtime)
    return runtime


def _command_runtime(
    cli: Cli,
    modules: Sequence[ModuleType],
    requested: Sequence[str],
    events: EventRuntime | None,
    concurrency: int | None,
) -> ParticipantRuntime | None:
    """The handlers of commands from the orchestrator; None when ``--service`` named
    only services that handle events."""
    event_names = {s.service for s in events.services} if events is not None else set()
    only = tuple(s for s in requested if s not in event_names)
    if events is not None and not (_has_commands(modules) and (not requested or bool(only))):
        return None
    bus = RedisStreams.from_settings(cli.settings)
    cli.on_close(bus.close)
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
    return runtime


def _run_participants(commands: ParticipantRuntime | None, events: EventRuntime | None) -> None:
    stop = threading.Event()
    with stop_on_signals(stop):
        if commands is not None:
            commands.start()
        if events is not None:
            events.start()
        wait_for(stop)
        click.echo("draining: finishing the commands and events in hand", err=True)
        drained = events.stop() if events is not None else True
        if (commands is not None and not commands.stop()) or not drained:
            click.echo("some were still running; they are delivered again", err=True)
