"""``saga bulk dry-run|run|stop|show|list``: recovering many instances at once.

A dry run keeps what it previewed under a snapshot token; ``run --snapshot
TOKEN`` acts on exactly those instances (``run --expect N`` instead takes
what matches at confirmation, refused unless there are N), so what runs is
what the operator looked at. The operation and each item's outcome are kept
in the store, and any host may stop it; ``show`` follows the applied items
to their end before printing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import click

from engine.bulk.model import MAX_BATCH, MAX_ITEMS, BulkFilter, BulkOperation, ItemOutcome
from engine.bulk.recovery import BulkRecovery
from engine.cli.context import Cli, pass_cli
from engine.cli.params import (
    ID,
    WholeNumber,
    actor_option,
    json_option,
    parse_state,
    parse_time,
    reason_option,
)
from engine.cli.processes import stop_on_signals
from engine.cli.render import (
    echo,
    print_json,
    render_bulk_list,
    render_bulk_report,
    render_dry_run,
    tally,
)
from engine.errors import InvalidInput
from engine.interventions import Action
from engine.states import SagaState
from engine.store.bulk import BulkStore

F = TypeVar("F", bound=Callable[..., Any])

_action_argument = click.argument("action", type=click.Choice([str(a) for a in Action]))


@click.group("bulk")
def bulk() -> None:
    """Recover many instances at once: dry-run, run, stop, show, list."""


def _filter_options(fn: F) -> F:
    """The options that choose the instances, read back by :func:`_bulk_filter`."""
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


def _bulk_filter(options: dict[str, Any]) -> BulkFilter:
    return BulkFilter(
        saga_name=options["saga_name"],
        state=parse_state(options["state"]),
        stuck=options["stuck"],
        step_name=options["step_name"],
        error_text=options["error_text"],
        time_field=options["time_field"],
        time_from=parse_time(options["time_from"], "--from"),
        time_to=parse_time(options["time_to"], "--to"),
    )


@bulk.command("dry-run")
@_action_argument
@_filter_options
@json_option
@pass_cli
def bulk_dry_run(cli: Cli, /, action: str, as_json: bool, **options: Any) -> None:
    """Count and sample the instances ACTION would touch; changes nothing."""
    dry = cli.engine().bulk_recovery().dry_run(Action(action), _bulk_filter(options))
    if as_json:
        print_json(dry.to_json())
    else:
        render_dry_run(dry)


@bulk.command("run")
@_action_argument
@_filter_options
@reason_option
@click.option(
    "--snapshot",
    metavar="TOKEN",
    help="The token the dry run printed: act on exactly the instances it previewed.",
)
@click.option(
    "--expect",
    "expected",
    type=WholeNumber(0, MAX_ITEMS),
    metavar="N",
    help="Or the count the dry run showed; without either, the dry run is shown and nothing runs.",
)
@click.option("--batch-size", type=WholeNumber(1, MAX_BATCH), default=50, show_default=True)
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
@actor_option
@json_option
@pass_cli
def bulk_run(
    cli: Cli,
    /,
    action: str,
    reason: str,
    snapshot: str | None,
    expected: int | None,
    batch_size: int,
    rate: float,
    max_failure_rate: float,
    actor: str,
    as_json: bool,
    **options: Any,
) -> None:
    """Apply ACTION to every instance the filter matches, in the foreground (Ctrl-C stops)."""
    recovery = cli.engine().bulk_recovery()
    limit = max_failure_rate / 100
    if snapshot is not None:
        op = recovery.confirm(
            Action(action),
            snapshot,
            actor=actor,
            reason=reason,
            batch_size=batch_size,
            rate_per_second=rate,
            max_failure_rate=limit,
            origin=cli.origin,
        )
    elif expected is not None:
        op = recovery.create(
            Action(action),
            _bulk_filter(options),
            actor=actor,
            reason=reason,
            expected_count=expected,
            batch_size=batch_size,
            rate_per_second=rate,
            max_failure_rate=limit,
            origin=cli.origin,
        )
    else:
        dry = recovery.dry_run(Action(action), _bulk_filter(options))
        render_dry_run(dry)
        raise InvalidInput(
            "--snapshot",
            f"confirm what the dry run showed: run again with --snapshot {dry.snapshot} "
            f"(or --expect {dry.count})",
        )
    if not as_json:
        echo(f"bulk operation {op.id}: {op.action} on {op.total} instance(s)")
    done = _follow(recovery, op.id, actor, quiet=as_json)
    if as_json:
        print_json({"operation": done.to_json()})
        return
    echo(f"bulk operation {done.id} {done.status}: {tally(done)}; {done.note or ''}")


def _follow(recovery: BulkRecovery, operation_id: str, actor: str, quiet: bool) -> BulkOperation:
    """Run the operation in a thread; print progress; Ctrl-C raises its stop flag."""
    thread = recovery.spawn(operation_id)
    stop = threading.Event()
    with stop_on_signals(stop):
        while thread.is_alive():
            thread.join(1.0)
            if stop.is_set() and recovery.get(operation_id).stop_requested_at is None:
                recovery.stop(operation_id, actor)
            if not quiet and thread.is_alive():
                echo(f"  {tally(recovery.get(operation_id))}", err=True)
    return recovery.get(operation_id)


@bulk.command("stop")
@click.argument("operation_id", type=ID)
@actor_option
@pass_cli
def bulk_stop(cli: Cli, operation_id: str, actor: str) -> None:
    """Stop a running bulk operation before its next item (from any host)."""
    op = cli.engine().bulk_recovery().stop(operation_id, actor)
    echo(f"bulk operation {op.id}: stop requested by {actor}; it is {op.status}")


@bulk.command("show")
@click.argument("operation_id", type=ID)
@click.option(
    "--outcome", type=click.Choice(["pending", "applied", "skipped", "error", "failed_again"])
)
@json_option
@pass_cli
def bulk_show(cli: Cli, operation_id: str, outcome: str | None, as_json: bool) -> None:
    """Show a bulk operation's report: settings, totals, and every item's outcome (the
    applied ones followed to their end first)."""
    recovery = cli.engine().bulk_recovery()
    op = recovery.follow(operation_id)
    wanted = ItemOutcome(outcome) if outcome else None
    items = recovery.store.items(operation_id, outcome=wanted, limit=MAX_ITEMS).items
    if as_json:
        print_json({"operation": op.to_json(), "items": [i.to_json() for i in items]})
    else:
        render_bulk_report(op, items)


@bulk.command("list")
@json_option
@pass_cli
def bulk_list(cli: Cli, as_json: bool) -> None:
    """List recent bulk operations, newest first."""
    ops = BulkStore(cli.store().db).recent()
    if as_json:
        print_json({"operations": [o.to_json() for o in ops]})
    else:
        render_bulk_list(ops)
