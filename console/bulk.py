"""Bulk recovery pages: choose instances by filter, see a dry run, confirm, watch, stop.

The engine does the work (bulk recovery, built once as
:class:`console.services.Bulk`); these views parse input and render. The dry
run keeps what it previewed as a snapshot; the confirmation form carries its
token, and the operation acts on exactly those instances (the report says how
many more matched by then, and offers a dry run for them). A confirmation
that is refused (400, 409) shows the form again with everything typed in it,
reason included, and a fresh dry run when the filter allows one.

Running happens in a background thread of this console process, with all
state in the store: the report page follows the applied items and shows
progress from the store (htmx polls its partial until the operation has
ended and every item's outcome is final), a stop from any console process
raises the flag the runner checks between items, and an operation whose
process died shows as interrupted, with a Resume button.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, current_app, flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from console import describe, services
from console.auth import require_role
from console.errors import error_page
from console.htmx import request
from console.params import parse_list
from console.services import (
    MAX_BATCH,
    MAX_BULK_REASON,
    MAX_ITEMS,
    MAX_RATE,
    MIN_RATE,
    MIN_SAMPLE,
    BulkFilter,
    BulkNotFound,
    BulkOperation,
    DryRun,
    ItemOutcome,
    Role,
    SelectionChanged,
    SnapshotGone,
)
from engine.errors import InvalidInput, InvalidTransition
from engine.inputs import optional_int
from engine.model import now_ms
from engine.operations import Action, Origin
from engine.states import SagaState

bp = Blueprint("bulk", __name__)

ITEMS_PAGE = 100
#: The filter and run settings a form carries; links and hidden fields repeat them.
FIELDS = (
    "action",
    "saga",
    "state",
    "step",
    "error",
    "from",
    "to",
    "time_field",
    "batch_size",
    "rate",
    "max_failure",
    "outside",
)
#: The longest snapshot token and operation id a form may carry.
MAX_TOKEN = 36
DEFAULTS = {"batch_size": "50", "rate": "5", "max_failure": "20", "time_field": "created"}


@dataclass(frozen=True)
class BulkRequest:
    """A bulk action as the form describes it."""

    action: Action
    selection: BulkFilter
    batch_size: int
    rate: float
    max_failure_pct: float
    args: dict[str, str]  # the raw fields, to repeat in links and hidden inputs


def init_app(app: Flask) -> None:
    """Map the bulk errors to their pages."""
    app.register_error_handler(BulkNotFound, _not_found)
    app.register_error_handler(SelectionChanged, _selection_changed)


def _not_found(exc: BulkNotFound) -> ResponseReturnValue:
    return error_page(404, f"No bulk operation has the id {exc.operation_id!r}.")


def _selection_changed(exc: SelectionChanged) -> ResponseReturnValue:
    return error_page(
        409,
        f"Nothing was started: {exc.why}. Go back to the dry run, check the instances "
        "again, and confirm.",
        "The matching instances changed",
    )


@bp.get("/bulk")
def operations() -> ResponseReturnValue:
    """Recent bulk operations, newest first."""
    before = request.args.get("before", "").strip() or None
    ops = services.get().bulk.recent(limit=51, before=before)
    return render_template(
        "bulk_list.html",
        ops=ops[:50],
        next_before=ops[49].id if len(ops) > 50 else None,
        now=now_ms(),
    )


@bp.get("/bulk/new")
@require_role(Role.OPERATOR)
def new() -> ResponseReturnValue:
    """The filter form; with ``dry_run=1``, the dry run and the confirmation below it."""
    raw = _fields(request.args)
    reason = request.args.get("reason", "")
    dry: DryRun | None = None
    problem: str | None = None
    if request.args.get("dry_run"):
        try:
            wanted = parse_request(request.args)
        except InvalidInput as exc:
            problem = str(exc)
        else:
            dry = services.get().bulk.dry_run(wanted.action, wanted.selection)
    status = 400 if problem else 200
    return render_template("bulk_new.html", **_form_context(raw, dry, problem, reason)), status


@bp.post("/bulk")
@require_role(Role.OPERATOR)
def start() -> ResponseReturnValue:
    """Make the operation of the instances the dry run previewed, and run it; a refusal
    shows the form again with everything typed in it."""
    reason = request.form.get("reason", "")
    try:
        wanted = parse_request(request.form)
    except InvalidInput as exc:
        return _refused(str(exc), 400, reason, None)
    bulk = services.get().bulk
    try:
        token = _text(request.form, "snapshot", MAX_TOKEN)
        if token is None:
            raise InvalidInput("snapshot", "confirm a dry run: run the dry run first")
        op = bulk.confirm(
            wanted.action,
            token,
            actor=current_user.name,
            reason=reason,
            batch_size=wanted.batch_size,
            rate_per_second=wanted.rate,
            max_failure_rate=wanted.max_failure_pct / 100,
            origin=Origin.console(current_user.name),
        )
    except SnapshotGone as exc:
        return _refused(f"{exc.why}. Here is a new dry run; confirm it.", 409, reason, wanted)
    except InvalidInput as exc:
        return _refused(str(exc), 400, reason, wanted)
    bulk.spawn(op.id)
    current_app.logger.info(
        "user %s started bulk %s: %s on %d instances", current_user.name, op.id, op.action, op.total
    )
    flash(f"Bulk {describe.LABELS[op.action].lower()} started on {op.total} instance(s).")
    return redirect(url_for("bulk.report", operation_id=op.id))


def _refused(
    problem: str, status: int, reason: str, wanted: BulkRequest | None
) -> ResponseReturnValue:
    """The form again, with what was typed (reason included) and, when the filter is
    valid, a fresh dry run to confirm instead."""
    raw = _fields(request.form)
    dry = None if wanted is None else services.get().bulk.dry_run(wanted.action, wanted.selection)
    context = _form_context(raw, dry, problem, reason)
    return render_template("bulk_new.html", **context), status


@bp.get("/bulk/<operation_id>")
def report(operation_id: str) -> ResponseReturnValue:
    """The report: settings, live progress, and every item's outcome (paged).

    Each look follows the applied items that have not ended yet, so the page and its
    polled partial say what became of them, until every one has ended."""
    bulk = services.get().bulk
    op = bulk.get(operation_id)
    if not op.settled:
        op = bulk.follow(operation_id)
    now = now_ms()
    if request.htmx:
        return render_template("_bulk_progress.html", op=op, now=now, again=_again_args(op))
    outcome = _outcome(request.args.get("outcome", ""))
    after = _int(request.args, "after", 0, 10**9)
    page = bulk.items(operation_id, outcome=outcome, after=after, limit=ITEMS_PAGE)
    return render_template(
        "bulk_report.html",
        op=op,
        now=now,
        page=page,
        outcome=outcome,
        after=after,
        outcomes=list(ItemOutcome),
        labels=describe.LABELS,
        again=_again_args(op),
    )


def _again_args(op: BulkOperation) -> dict[str, str]:
    """The dry-run link's fields for the instances that matched on top of ``op``'s."""
    flt = op.selection
    state = "stuck" if flt.stuck else (str(flt.state) if flt.state else "")
    found = {
        "dry_run": "1",
        "action": str(op.action),
        "saga": flt.saga_name or "",
        "state": state,
        "step": flt.step_name or "",
        "error": flt.error_text or "",
        "time_field": flt.time_field,
        "from": _local(flt.time_from),
        "to": _local(flt.time_to),
        "outside": op.id,
    }
    return {k: v for k, v in found.items() if v}


def _local(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M")


@bp.post("/bulk/<operation_id>/stop")
@require_role(Role.OPERATOR)
def stop(operation_id: str) -> ResponseReturnValue:
    """Raise the stop flag; the runner (in whichever process) stops before its next item."""
    op = services.get().bulk.stop(operation_id, current_user.name)
    current_app.logger.info("user %s stopped bulk %s", current_user.name, operation_id)
    if op.is_running:
        flash("Stop requested: the operation stops before its next instance.")
    else:
        flash("Stopped: nobody was running it, so it ended at once.")
    return redirect(url_for("bulk.report", operation_id=operation_id))


@bp.post("/bulk/<operation_id>/resume")
@require_role(Role.OPERATOR)
def resume(operation_id: str) -> ResponseReturnValue:
    """Run an interrupted operation again, in this console process."""
    bulk = services.get().bulk
    op = bulk.get(operation_id)
    if not op.interrupted(now_ms()):
        raise InvalidTransition(
            operation_id,
            "resume bulk operation",
            str(op.status),
            "only an interrupted operation can be resumed; a live one is still running",
        )
    bulk.spawn(operation_id)
    current_app.logger.info("user %s resumed bulk %s", current_user.name, operation_id)
    flash("Resumed in this console process: it goes on from the next pending instance.")
    return redirect(url_for("bulk.report", operation_id=operation_id))


# -- parsing ---------------------------------------------------------------------


def parse_request(form: Mapping[str, str]) -> BulkRequest:
    """The action, the filter and the run settings; InvalidInput (400) when malformed."""
    raw = _fields(form)
    action = _action(raw.get("action", ""))
    listed = parse_list({k: raw[k] for k in ("state", "saga", "from", "to") if raw.get(k)}).filter
    selection = BulkFilter(
        saga_name=listed.saga_name,
        state=listed.state,
        stuck=listed.stuck,
        step_name=_text(raw, "step", 100),
        error_text=_text(raw, "error", 200),
        time_field=raw.get("time_field") or "created",
        time_from=listed.created_from,
        time_to=listed.created_to,
        outside=_text(raw, "outside", MAX_TOKEN),
    )
    return BulkRequest(
        action=action,
        selection=selection,
        batch_size=_int(raw, "batch_size", 1, MAX_BATCH),
        rate=_float(raw, "rate", MIN_RATE, MAX_RATE),
        max_failure_pct=_float(raw, "max_failure", 0, 100),
        args=raw,
    )


def _fields(form: Mapping[str, str]) -> dict[str, str]:
    found = {k: form.get(k, "").strip() for k in FIELDS}
    for key, value in DEFAULTS.items():
        found[key] = found[key] or value
    return {k: v for k, v in found.items() if v}


def _action(raw: str) -> Action:
    try:
        return Action(raw)
    except ValueError:
        raise InvalidInput(
            "action", f"{raw!r} is not one of {', '.join(a.value for a in Action)}"
        ) from None


def _outcome(raw: str) -> ItemOutcome | None:
    if not raw:
        return None
    try:
        return ItemOutcome(raw)
    except ValueError:
        raise InvalidInput("outcome", f"{raw!r} is not an item outcome") from None


def _text(form: Mapping[str, str], name: str, limit: int) -> str | None:
    raw = form.get(name, "").strip()
    if len(raw) > limit:
        raise InvalidInput(name, f"is {len(raw)} characters; the limit is {limit}")
    return raw or None


def _int(form: Mapping[str, str], name: str, low: int, high: int) -> int:
    found = optional_int(name, form.get(name), low=low, high=high)
    return low if found is None else found


def _float(form: Mapping[str, str], name: str, low: float, high: float) -> float:
    raw = form.get(name, "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(name, f"{raw!r} is not a number") from None
    if not low <= value <= high:
        raise InvalidInput(name, f"must be from {low:g} to {high:g}, not {raw}")
    return value


def _form_context(
    raw: dict[str, str], dry: DryRun | None, problem: str | None, reason: str = ""
) -> dict[str, Any]:
    return {
        "args": raw,
        "reason": reason,
        "dry": dry,
        "problem": problem,
        "actions": list(Action),
        "labels": describe.LABELS,
        "states": [*SagaState, "stuck"],
        "saga_names": services.get().engine.registry.names(),
        "max_items": MAX_ITEMS,
        "max_reason": MAX_BULK_REASON,
        "min_sample": MIN_SAMPLE,
    }
