"""An operator's hands on one instance: ``saga retry|skip|compensate|cancel``,
``edit-retry``, ``resolve``, and the dead-letter queue they work from (``deadletters``).

Every action goes through the engine's operations, which check the reason,
the state and ``--expected-version``, and record the action in the audit log:
``--actor`` as the claimed actor, and beside it the origin ``cli`` with the OS
user and host that ran the command (:func:`engine.cli.context.shell_origin`).
"""

from __future__ import annotations

import click

from engine.cli.context import Cli, pass_cli
from engine.cli.documents import instance_json
from engine.cli.params import (
    ID,
    actor_option,
    expected_version_option,
    json_option,
    page_options,
    parse_payload,
    reason_option,
)
from engine.cli.render import echo, print_json, render_dead_letters
from engine.interventions import Action
from engine.model import Instance
from engine.queries import Queries

_OPERATOR_HELP = {
    Action.RETRY: "Run the failed or waiting step (or compensation) now, with a fresh "
    "retry budget.",
    Action.SKIP: "Mark the current step (or its compensation) done by hand and go on.",
    Action.COMPENSATE: "Stop going forward and compensate every started step, from the "
    "current one.",
    Action.CANCEL: "Stop the instance where it stands; nothing more runs, nothing is undone.",
}


def operator_command(action: Action) -> click.Command:
    """``saga ACTION SAGA_ID --reason ...``: one command per operator action."""

    @click.command(name=str(action), help=_OPERATOR_HELP[action])
    @click.argument("saga_id", type=ID)
    @reason_option
    @actor_option
    @expected_version_option
    @json_option
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
            action,
            saga_id,
            actor=actor,
            reason=reason,
            expected_version=expected_version,
            origin=cli.origin,
        )
        _say_done(cli, str(action), inst, actor, as_json)

    return command


#: ``saga retry``, ``skip``, ``compensate`` and ``cancel``.
operator_commands = [operator_command(action) for action in Action]


@click.command("edit-retry")
@click.argument("saga_id", type=ID)
@click.option(
    "--payload",
    required=True,
    metavar="JSON",
    help="The corrected payload (every step's input), as JSON text or @FILE.",
)
@reason_option
@actor_option
@expected_version_option
@json_option
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
        origin=cli.origin,
    )
    _say_done(cli, "edit_retry", inst, actor, as_json)


@click.command("resolve")
@click.argument("saga_id", type=ID)
@reason_option
@actor_option
@expected_version_option
@json_option
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
        saga_id,
        actor=actor,
        reason=reason,
        expected_version=expected_version,
        origin=cli.origin,
    )
    _say_done(cli, "resolve", inst, actor, as_json)


def _say_done(cli: Cli, action: str, inst: Instance, actor: str, as_json: bool) -> None:
    if as_json:
        print_json({"action": action, "instance": instance_json(inst)})
        return
    echo(
        f"{action}: saga {inst.id} is now {inst.state} at step "
        f"{inst.current.name!r} (version {inst.version}); recorded as {actor}, "
        f"from {cli.origin}"
    )


@click.command("deadletters")
@click.option("--saga", "saga_name", metavar="NAME", help="Only dead letters of this saga.")
@click.option("--step", "step_name", metavar="NAME", help="Only those failing at this step.")
@page_options
@json_option
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
        print_json(
            {"dead_letters": [d.to_json() for d in page.items], "next_cursor": page.next_cursor}
        )
    else:
        render_dead_letters(page)
