"""Output for people (aligned tables, UTC times) and the ``--json`` documents' envelope.

Commands decide what to say; this module decides how it looks. What a person
reads may change between releases; the ``--json`` documents may not (docs/cli.md).

Every line for people goes out through :func:`echo` or :func:`print_table`,
which show control and bidirectional characters as escapes
(:func:`engine.display.visible`): ids, names, business keys, errors, reasons and
payloads come from outside, and must not move the cursor, clear or retitle the
operator's terminal, or reorder a line. The ``--json`` documents print values
exactly; JSON escapes control characters itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from engine.bulk.model import MAX_ITEMS, BulkItem, BulkOperation, DryRun
from engine.display import visible
from engine.model import now_ms
from engine.origins import Origin
from engine.queries import DeadLetterPage, Page

#: Bumped when a ``--json`` document changes incompatibly (docs/cli.md).
JSON_SCHEMA_VERSION = 1


def print_json(doc: dict[str, Any]) -> None:
    """Print ``doc`` as a ``--json`` document, with its schema version."""
    click.echo(json.dumps({"schema_version": JSON_SCHEMA_VERSION, **doc}, indent=2))


def echo(line: str = "", *, err: bool = False) -> None:
    """Print one line for people, its control and bidirectional characters escaped.

    Only values put them there (the text of a command is plain), so escaping the
    whole line escapes every value in it, and a newline in a value cannot start a
    line of its own.
    """
    click.echo(visible(line), err=err)


def print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: int = 0) -> None:
    """Columns as wide as their widest cell; nothing at all when there are no rows.

    Each cell is escaped (:func:`engine.display.visible`) before the widths are
    measured, so a value with control characters stays in its column.
    """
    if not rows:
        return
    shown = [[visible(str(c)) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in shown) for i in range(len(header))]
    for row in shown:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        click.echo((" " * indent + "  ".join(cells)).rstrip())


def print_more(next_cursor: str | None) -> None:
    """How to ask for the next page, when there is one."""
    if next_cursor:
        echo(f"more: add --cursor {next_cursor}")


# -- times and text -------------------------------------------------------------


def when(ms: int | None) -> str:
    """``2025-01-31 12:00:00.123Z``, or nothing for no time."""
    if ms is None:
        return ""
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + f".{ms % 1000:03d}Z"


def clock(ms: int) -> str:
    """The time of day of ``ms``, for a timeline whose events are close together."""
    return when(ms)[11:]


def ago(ms: int) -> str:
    """How long ago ``ms`` was, in its largest whole unit (``3h ago``)."""
    seconds = max(now_ms() - ms, 0) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def first_line(text: str | None, width: int = 80) -> str:
    """The first line of an error, cut to ``width``: a traceback would break the table."""
    if not text:
        return ""
    line = text.strip().splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"


# -- instances and dead letters ---------------------------------------------------


def render_instances(page: Page) -> None:
    """``saga list``: one row per instance."""
    rows = [
        (
            i.id,
            f"{i.saga_name} v{i.saga_version}",
            i.state,
            f"{i.current_step + 1}/{i.step_count} {i.current_step_name or ''}",
            i.business_key or "-",
            ago(i.updated_at),
        )
        for i in page.items
    ]
    print_table(("ID", "SAGA", "STATE", "STEP", "BUSINESS KEY", "UPDATED"), rows)
    if not rows:
        echo("no instances match")
    print_more(page.next_cursor)


def render_dead_letters(page: DeadLetterPage) -> None:
    """``saga deadletters``: one row per instance waiting for an operator."""
    rows = [
        (
            d.saga_id,
            f"{d.saga_name} v{d.saga_version}",
            f"{d.step_name} ({d.phase})",
            str(d.attempts),
            when(d.first_failure_at),
            when(d.last_failure_at),
            first_line(d.error, 60),
        )
        for d in page.items
    ]
    header = ("ID", "SAGA", "FAILING STEP", "ATTEMPTS", "FIRST FAILURE", "LAST FAILURE", "ERROR")
    print_table(header, rows)
    if not rows:
        echo("no dead letters: nothing waits for an operator")
    print_more(page.next_cursor)


def render_show(doc: dict[str, Any]) -> None:
    """``saga show``, from the same document ``saga show --json`` prints."""
    _render_summary(doc)
    echo()
    echo("steps")
    print_table(
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
    echo()
    echo("timeline")
    print_table(
        ("TIME", "EVENT", "STEP", "ATTEMPT", "ACTOR", "ERROR"),
        [
            (
                clock(e["at"]),
                e["kind"],
                _step_label(e),
                str(e["attempt"] or ""),
                e["actor"],
                first_line(e["error"]),
            )
            for e in doc["events"]
        ],
        indent=2,
    )
    _render_records(doc)


def _render_summary(doc: dict[str, Any]) -> None:
    inst = doc["instance"]
    allowed = doc["allowed_actions"]
    echo(
        f"saga {inst['id']}  {inst['saga_name']} v{inst['saga_version']}  "
        f"{inst['state']}  (version {inst['version']})"
    )
    lease = inst["lease_owner"] and f"{inst['lease_owner']} until {when(inst['lease_expires_at'])}"
    actions = (
        "(register the saga with -A to see them)"
        if allowed is None
        else ", ".join(allowed) or "none: it has finished"
    )
    for label, value in (
        ("correlation id", inst["correlation_id"]),
        ("business key", inst["business_key"]),
        ("idempotency key", inst["idempotency_key"]),
        ("created", when(inst["created_at"])),
        ("last progress", when(inst["last_progress_at"])),
        ("next run", when(inst["next_run_at"])),
        ("lease", lease),
        ("payload", json.dumps(inst["payload"])),
        ("actions", actions),
    ):
        if value:
            echo(f"  {label + ':':<17}{value}")


def _render_records(doc: dict[str, Any]) -> None:
    if doc["dead_letters"]:
        echo()
        echo("dead letters")
        for d in doc["dead_letters"]:
            state = (
                f"resolved by {d['resolved_by']} ({d['resolution']})"
                if d["resolved_at"]
                else "open"
            )
            echo(
                f"  {when(d['created_at'])}  {d['step_name']} {d['phase']} after "
                f"{d['attempts']} attempts: {first_line(d['error'])}  [{state}]"
            )
    if doc["operator_actions"]:
        echo()
        echo("operator actions")
        for a in doc["operator_actions"]:
            echo(
                f"  {when(a['at'])}  {a['actor']} (from {_origin(a)}) {a['action']} at "
                f"{a['step_name']}: {a['state_before']} -> {a['state_after']}  "
                f"reason: {a['reason']}"
            )


def _origin(action: dict[str, Any]) -> str:
    """Where an audited action came from (``cli: alice@ops-1``): its actor is only a claim."""
    return str(Origin.of(action["origin"], action["origin_detail"]))


def _side(side: dict[str, Any]) -> str:
    text = str(side["status"])
    if side["attempts"]:
        text += f" ({side['attempts']} attempt{'s' if side['attempts'] != 1 else ''})"
    if side["error"] and side["status"] not in ("succeeded", "compensated"):
        text += f": {first_line(side['error'], 60)}"
    return text


def _step_label(event: dict[str, Any]) -> str:
    if event["step_name"] is None:
        return ""
    return f"{event['step_name']} {event['phase'] or ''}".strip()


# -- bulk operations --------------------------------------------------------------


def tally(op: BulkOperation) -> str:
    """A bulk operation's progress in one line: what the action did, then what became of
    the instances it was applied to."""
    results = op.results
    return (
        f"{op.processed}/{op.total} processed: {op.accepted} applied, {op.skipped} skipped, "
        f"{op.errors} errors; of the applied: {results.get('completed', 0)} completed, "
        f"{results.get('compensated', 0)} compensated, {results.get('cancelled', 0)} cancelled, "
        f"{op.failed_again} failed again, {op.still_running} still running" + _other_results(op)
    )


def _other_results(op: BulkOperation) -> str:
    other = op.results.get("superseded", 0) + op.results.get("gone", 0)
    return f", {other} superseded or gone" if other else ""


def render_dry_run(dry: DryRun) -> None:
    """What a bulk action would touch: the count and a sample."""
    if dry.too_many:
        echo(f"matches more than {MAX_ITEMS:,} instances: narrow the filter")
        return
    echo(f"{dry.action} would touch {dry.count} instance(s): {dry.selection.describe()}")
    print_table(
        ("ID", "SAGA", "STATE", "STEP", "APPLIES", "ERROR"),
        [
            (
                s.saga_id,
                f"{s.saga_name} v{s.saga_version}",
                s.state,
                s.step_name,
                "yes" if s.applies else ("?" if s.applies is None else f"no: {s.why_not}"),
                first_line(s.error, 50),
            )
            for s in dry.sample
        ],
        indent=2,
    )
    if dry.count > len(dry.sample):
        echo(f"  ... and {dry.count - len(dry.sample)} more")
    if dry.snapshot is not None:
        echo(
            f"snapshot {dry.snapshot} (until {when(dry.expires_at or 0)}): "
            f"saga bulk run {dry.action} --snapshot {dry.snapshot} --reason ... "
            "acts on exactly these"
        )


def render_bulk_report(op: BulkOperation, items: Sequence[BulkItem]) -> None:
    """``saga bulk show``: the operation's settings and totals, then every item."""
    echo(f"bulk operation {op.id}: {op.action} by {op.created_by}, {op.status}")
    echo(f"  filter:  {op.selection.describe()}")
    echo(f"  reason:  {op.reason}")
    echo(f"  totals:  {tally(op)}")
    if op.note:
        echo(f"  note:    {op.note}")
    if op.more_matching:
        echo(
            f"  more:    {op.more_matching} more matched at confirmation and were left alone; "
            "dry-run again for them"
        )
    echo(f"  settled: {'yes' if op.settled else 'no, still following'}")
    print_table(
        ("#", "ID", "BEFORE", "OUTCOME", "AFTER", "THEN", "NOW", "WHY"),
        [
            (
                str(i.seq),
                i.saga_id,
                i.state_before,
                str(i.outcome),
                i.state_after or "",
                "" if i.result is None else str(i.result),
                i.state_now or "purged",
                first_line(i.error, 60),
            )
            for i in items
        ],
        indent=2,
    )


def render_bulk_list(ops: Sequence[BulkOperation]) -> None:
    """``saga bulk list``: one row per operation."""
    print_table(
        ("ID", "ACTION", "BY", "STATUS", "CREATED", "PROGRESS"),
        [
            (o.id, str(o.action), o.created_by, str(o.status), when(o.created_at), tally(o))
            for o in ops
        ],
    )
