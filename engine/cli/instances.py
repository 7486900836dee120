"""Starting and looking at instances: ``saga start``, ``signal``, ``list`` and ``show``."""

from __future__ import annotations

import click

from engine.cli.context import Cli, pass_cli
from engine.cli.documents import describe, instance_json
from engine.cli.params import (
    ID,
    json_option,
    page_options,
    parse_payload,
    parse_state,
    shell_user,
)
from engine.cli.render import echo, print_json, render_instances, render_show
from engine.queries import InstanceFilter, Queries
from engine.runtime import Started
from engine.states import SagaState


@click.command("start")
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
@json_option
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
    if as_json:
        print_json({"created": started.created, "instance": instance_json(started.instance)})
    else:
        _say_started(started)


def _say_started(started: Started) -> None:
    inst = started.instance
    verb = "started" if started.created else "already started (same idempotency key)"
    echo(f"{verb}: {inst.id} ({inst.saga_name} v{inst.saga_version}, {inst.state})")
    echo(f"  correlation id: {inst.correlation_id}")
    if inst.business_key:
        echo(f"  business key:   {inst.business_key}")
    echo(f"  see it with:    saga show {inst.id}")


@click.command("signal")
@click.argument("saga_id", type=ID)
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
    default=shell_user,
    show_default="$USER or 'cli'",
    help="Who sends it, for the timeline.",
)
@click.option(
    "--reason",
    default=None,
    help="Why a person sends it: then the audit log records it as SENT_BY's action "
    "(a claim; the OS user and host are recorded beside it).",
)
@json_option
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
        saga_id,
        event,
        parse_payload(data, "--data"),
        sent_by=sent_by,
        reason=reason,
        origin=cli.origin,
    )
    inst = delivered.instance
    if as_json:
        print_json({"event": event, "taken": delivered.taken, "instance": instance_json(inst)})
    elif delivered.taken:
        echo(f"{event}: taken by saga {inst.id}, now {inst.state} at step {inst.current.name!r}")
    else:
        echo(f"{event}: stored for saga {inst.id}; its step takes it when it begins waiting")


@click.command("list")
@click.option("--state", help=f"Only this state: {', '.join(SagaState)}.")
@click.option("--saga", "saga_name", metavar="NAME", help="Only instances of this saga.")
@click.option("--search", metavar="TEXT", help="A saga id, correlation id or business key.")
@page_options
@json_option
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
        print_json(
            {"instances": [i.to_json() for i in page.items], "next_cursor": page.next_cursor}
        )
    else:
        render_instances(page)


@click.command("show")
@click.argument("saga_id", type=ID)
@json_option
@pass_cli
def show(cli: Cli, saga_id: str, as_json: bool) -> None:
    """Show an instance: its steps, timeline, dead letters and operator actions."""
    doc = describe(cli, saga_id)
    if as_json:
        print_json(doc)
    else:
        render_show(doc)
