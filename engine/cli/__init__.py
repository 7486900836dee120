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

This package holds the engine's commands, one module per group, with the
rendering for people apart (:mod:`engine.cli.render`). It knows nothing of the
console: the installed ``saga`` script is :data:`console.cli.main`, which adds
the console's commands to :data:`main` with :func:`with_commands`.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click

from engine import logs
from engine.cli.actions import deadletters, edit_retry, operator_commands, resolve
from engine.cli.bulk import bulk
from engine.cli.context import Cli
from engine.cli.db import db
from engine.cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_OK,
    error_message,
    exit_code_for,
    fail,
)
from engine.cli.instances import list_, show, signal_, start
from engine.cli.processes import participant, sweeper, worker
from engine.errors import SagaError
from engine.loader import split_names
from engine.settings import Settings
from engine.store import DatabaseError

__all__ = ["Cli", "SagaGroup", "main", "with_commands"]

#: The distribution whose version ``saga --version`` prints.
DISTRIBUTION = "saga-engine"

# click 8.2+ raises this for a group called without a command; older versions exit 0.
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    t for t in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if t is not None
)


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
        except (click.ClickException, SagaError, DatabaseError) as exc:
            if not standalone_mode:
                raise
            if isinstance(exc, click.ClickException) and isinstance(exc, _NO_ARGS_IS_HELP):
                # `saga` alone: print the help as it is, not squeezed onto one line.
                click.echo(exc.format_message(), err=True)
                sys.exit(EXIT_BAD_INPUT)
            fail(error_message(exc), exit_code_for(exc))
        except click.Abort:
            if not standalone_mode:
                raise
            fail("aborted", EXIT_ERROR)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else EXIT_OK)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        found = version(DISTRIBUTION)
    except PackageNotFoundError:
        # Run from a checkout that was never installed (PYTHONPATH=.): no metadata to read.
        found = "unknown (saga-engine is not installed)"
    click.echo(f"saga {found}")
    ctx.exit()


@click.group("saga", cls=SagaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    "apps",
    multiple=True,
    metavar="MODULE",
    help="Module whose Saga objects to register; repeat or separate with commas "
    "(default: $SAGA_APP).",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
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


for _command in (
    db,
    worker,
    sweeper,
    participant,
    start,
    signal_,
    list_,
    show,
    *operator_commands,
    deadletters,
    edit_retry,
    resolve,
    bulk,
):
    main.add_command(_command)


def with_commands(*commands: click.Command) -> SagaGroup:
    """A ``saga`` group with the engine's commands and ``commands``; :data:`main` is
    left as it is, so what the engine offers does not depend on who imported what."""
    group = copy.copy(main)
    group.commands = dict(main.commands)
    for command in commands:
        group.add_command(command)
    return group
