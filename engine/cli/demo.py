"""``saga demo``, and the console's commands (``saga console``, ``saga user``) beside it."""

from __future__ import annotations

import threading

import click

from engine.cli.context import Cli, check_url, pass_cli
from engine.cli.processes import stop_on_signals


def console_commands() -> list[click.Command]:
    # `saga console` and `saga user ...` live with the console, which needs Flask.
    from console.commands import console_command, user_group

    return [console_command, user_group]


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
