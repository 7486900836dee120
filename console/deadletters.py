"""The dead-letter queue: every dead-lettered instance, and what an operator can do with each.

Per item: retry now, skip the step, edit the payload then retry (the audit
log keeps the payload before and after), or resolve by hand (the saga ends
cancelled: nothing more runs, nothing is undone). Each opens a confirmation
page that says what will happen, asks for a reason and carries the version
the operator saw, so a race answers 409 and applies nothing, as on the
instance page. Plain links and forms: it works with JavaScript off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from console import describe, services
from console.auth import bring_back, require_role
from console.forms import ActionForm, parse_json
from console.params import check_seen_version
from console.services import Role
from engine.errors import InvalidInput, InvalidTransition, UnknownSaga
from engine.inputs import MAX_NAME, optional_text
from engine.model import Instance
from engine.operations import Action, Origin
from engine.states import SagaState

bp = Blueprint("deadletters", __name__)

PAGE_SIZE = 50
#: A payload edit larger than this is refused (it is kept twice in the audit log).


@dataclass(frozen=True)
class Choice:
    """One thing an operator can do with a dead letter."""

    slug: str  # in the URL
    label: str
    css: str  # the button's class
    summary: str  # the button's title


CHOICES = {
    "retry": Choice("retry", "Retry", "primary", "Run the failed step again now"),
    "edit-retry": Choice(
        "edit-retry", "Edit input & retry", "secondary", "Correct the payload, then retry"
    ),
    "skip": Choice("skip", "Skip step", "secondary", "Mark the step done by hand and go on"),
    "resolve": Choice(
        "resolve",
        describe.RESOLVE,
        "resolve",
        "You dealt with it yourself: close it (the saga ends cancelled, recorded as resolved)",
    ),
}


@bp.get("/dead-letters")
def dead_letters() -> ResponseReturnValue:
    """Every dead-lettered instance, newest first, with its failing step and error."""
    saga_name = _arg("saga", MAX_NAME)
    step_name = _arg("step", MAX_NAME)
    before = _arg("before", 80)  # a cursor: engine.queries parses it
    svc = services.get()
    page = svc.queries.dead_lettered(
        saga_name=saga_name, step_name=step_name, limit=PAGE_SIZE, before=before
    )
    known = {(s.name, s.version) for s in svc.engine.registry}
    kept = {k: v for k, v in (("saga", saga_name), ("step", step_name)) if v}
    return render_template(
        "deadletters.html",
        page=page,
        args=kept,
        before=before,
        choices=CHOICES,
        acts=current_user.can(Role.OPERATOR),
        known=known,
        saga_names=svc.engine.registry.names(),
        # Domain events a choreography's handler gave up on, or could not read.
        event_letters=svc.queries.event_dead_letters(limit=PAGE_SIZE),
    )


@bp.route("/dead-letters/<saga_id>/<choice>", methods=["GET", "POST"])
@require_role(Role.OPERATOR)
def act(saga_id: str, choice: str) -> ResponseReturnValue:
    """GET: the confirmation (with the payload editor for edit-retry). POST: apply it."""
    picked = _choice(choice)
    svc = services.get()
    inst = svc.engine.get(saga_id)
    form = ActionForm()
    if request.method == "GET":
        check_seen_version(inst, request.args.get("version"))
        _check_dead_lettered(inst, picked)
        form.expected_version.data = inst.version
        carried = bring_back(form)
        return _confirm(inst, picked, form, payload_text=_pretty(inst.payload), carried=carried)
    payload_text = request.form.get("payload", "")
    if not form.validate_on_submit():
        return _confirm(inst, picked, form, payload_text=payload_text), 400
    try:
        done = _apply(picked, saga_id, form, payload_text)
    except _BadPayload as bad:
        return _confirm(inst, picked, form, payload_text=payload_text, problem=str(bad)), 400
    flash(
        f"{picked.label}: done by {current_user.name}. Saga {saga_id} went to "
        f"{done.state} (version {done.version})."
    )
    if request.args.get("back") == "instance":
        return redirect(url_for("sagas.instance", saga_id=saga_id))
    return redirect(url_for("deadletters.dead_letters"))


class _BadPayload(ValueError):
    """The edited payload is not JSON, or not a change; the form is shown again."""


def _apply(picked: Choice, saga_id: str, form: Any, payload_text: str) -> Instance:
    ops = services.get().operations
    who: dict[str, Any] = {
        "actor": current_user.name,
        "reason": form.reason.data,
        "expected_version": form.expected_version.data,
        "origin": Origin.console(current_user.name),
    }
    if picked.slug == "edit-retry":
        payload = _parse_payload(payload_text)
        try:
            return ops.edit_and_retry(saga_id, payload, **who)
        except InvalidInput as exc:
            if exc.field not in {"payload", "JSON value"}:
                raise
            raise _BadPayload(exc.problem) from exc
    if picked.slug == "resolve":
        return ops.resolve(saga_id, **who)
    return ops.act(Action(picked.slug), saga_id, **who)


def _parse_payload(text: str) -> Any:
    try:
        return parse_json(text)
    except ValueError as exc:
        raise _BadPayload(str(exc)) from None


def _confirm(
    inst: Instance,
    picked: Choice,
    form: Any,
    *,
    payload_text: str,
    problem: str | None = None,
    carried: bool = False,
) -> str:
    letter = services.get().queries.dead_letters(saga_id=inst.id, limit=1)
    return render_template(
        "deadletter_confirm.html",
        inst=inst,
        choice=picked,
        form=form,
        letter=letter[0] if letter else None,
        consequence=consequence(picked, inst),
        payload_text=payload_text,
        problem=problem,
        back=request.args.get("back", ""),
        carried=carried,
    )


def consequence(picked: Choice, inst: Instance) -> str:
    """What confirming ``picked`` does to ``inst``, in one paragraph."""
    if picked.slug in ("retry", "skip"):
        return describe.consequence(Action(picked.slug), inst)
    if picked.slug == "edit-retry":
        return describe.edit_retry_consequence(inst)
    return describe.resolve_consequence(inst)


def _choice(slug: str) -> Choice:
    picked = CHOICES.get(slug)
    if picked is None:
        raise InvalidInput("action", f"{slug!r} is not one of {', '.join(CHOICES)}")
    return picked


def _check_dead_lettered(inst: Instance, picked: Choice) -> None:
    registry = services.get().engine.registry
    if (inst.saga_name, inst.saga_version) not in {(s.name, s.version) for s in registry}:
        raise UnknownSaga(f"{inst.saga_name} v{inst.saga_version}", registry.names())
    if inst.state is not SagaState.FAILED:
        raise InvalidTransition(
            inst.id, picked.label.lower(), inst.state, "it is no longer dead-lettered"
        )


def _arg(name: str, limit: int) -> str | None:
    return optional_text(name, request.args.get(name), limit=limit)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
