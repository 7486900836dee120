"""Instances: the list by state, the search box, the instance page, and operator actions.

Each view parses its input (:mod:`console.params`), asks the engine's
queries or operations, and renders a page, or the ``_partial`` that an htmx
request (``request.htmx``) swaps in.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from console import describe, services
from console.auth import bring_back, require_role
from console.charts import step_charts
from console.forms import ActionForm, SignalForm
from console.htmx import request
from console.params import check_seen_version, parse_action, parse_list, parse_search
from console.services import CHOREOGRAPHED, Role, Saga
from console.timeline import build_steps, idempotency_keys
from engine.errors import InvalidInput, InvalidTransition, UnknownSaga
from engine.model import Instance, now_ms
from engine.operations import Action, Origin
from engine.queries import InstanceFilter, OpenWait
from engine.states import SagaState

bp = Blueprint("sagas", __name__)

PAGE_SIZE = 50
SEARCH_LIMIT = 50
#: Recent instances of the same saga type whose step durations the charts show.
CHART_RUNS = 200
#: The state tabs, in the order an on-call engineer looks at them.
TABS = [
    SagaState.FAILED,
    SagaState.RUNNING,
    SagaState.COMPENSATING,
    SagaState.COMPLETED,
    SagaState.COMPENSATED,
    SagaState.CANCELLED,
]


def index() -> ResponseReturnValue:
    """``/``: the instance list."""
    return redirect(url_for("sagas.list_instances"))


@bp.get("/sagas")
def list_instances() -> ResponseReturnValue:
    """The instance list: state tabs with counts, filters, one keyset page."""
    query = parse_list(request.args)
    svc = services.get()
    page = svc.queries.list_instances(query.filter, limit=PAGE_SIZE, cursor=query.cursor)
    cap = int(current_app.config["SAGA_COUNT_CAP"])
    counts = svc.queries.counts_by_state_capped(cap, query.filter.saga_name)
    stuck_count = svc.queries.count_stuck(cap, query.filter.saga_name)
    context: dict[str, Any] = {
        "page": page,
        "query": query,
        "tabs": TABS,
        "counts": counts,
        "stuck_count": stuck_count,
        "cap": cap,
        "total": _total_label(counts, cap),
        "saga_names": svc.engine.registry.names(),
        "poll_seconds": int(current_app.config["SAGA_LIST_POLL_SECONDS"]),
    }
    if request.htmx:
        return render_template("_instances.html", **context)
    return render_template("instances.html", **context)


@bp.get("/search")
def search() -> ResponseReturnValue:
    """Instances, dead letters and operator actions for a saga id, correlation id or key."""
    text = parse_search(request.args)
    if text is None:
        return render_template("search.html", q="", page=None, dead_letters=[], actions=[])
    queries = services.get().queries
    page = queries.list_instances(InstanceFilter(search=text), limit=SEARCH_LIMIT)
    ids = [item.id for item in page.items]
    dead_letters = [d for i in ids for d in queries.dead_letters(saga_id=i, open_only=False)]
    actions = [a for i in ids for a in queries.operator_actions(saga_id=i)]
    actions.sort(key=lambda a: a.id, reverse=True)
    return render_template(
        "search.html", q=text, page=page, dead_letters=dead_letters, actions=actions
    )


@bp.get("/sagas/<saga_id>")
def instance(saga_id: str) -> ResponseReturnValue:
    """One instance: steps, attempts, payload, outputs, actions, events; polled while live."""
    svc = services.get()
    inst = svc.engine.get(saga_id)
    if request.htmx and request.args.get("v") == str(inst.version):
        return "", 204  # nothing changed since the last poll: htmx keeps what it shows
    context = _instance_context(inst)
    if request.htmx:
        return render_template("_instance.html", **context)
    return render_template("instance.html", **context)


@bp.route("/sagas/<saga_id>/actions/<action_name>", methods=["GET", "POST"])
@require_role(Role.OPERATOR)
def act(saga_id: str, action_name: str) -> ResponseReturnValue:
    """GET: the confirmation page. POST: apply the action with the version the operator saw."""
    action = parse_action(action_name)
    svc = services.get()
    inst = svc.engine.get(saga_id)
    form = ActionForm()
    if request.method == "GET":
        check_seen_version(inst, request.args.get("version"))
        _check_allowed(inst, action)
        form.expected_version.data = inst.version
        carried = bring_back(form)
        return render_template(
            "confirm.html", **_confirm_context(inst, action, form), carried=carried
        )
    if not form.validate_on_submit():
        return render_template("confirm.html", **_confirm_context(inst, action, form)), 400
    done = svc.operations.act(
        action,
        saga_id,
        actor=current_user.name,
        reason=form.reason.data,
        expected_version=form.expected_version.data,
        origin=Origin.console(current_user.name),
    )
    flash(
        f"{describe.LABELS[action]}: done by {current_user.name}. The saga went to "
        f"{done.state} (version {done.version})."
    )
    return redirect(url_for("sagas.instance", saga_id=saga_id))


def _total_label(counts: dict[str, int], cap: int) -> str:
    total = sum(min(n, cap) for n in counts.values())
    return f"{total:,}+" if any(n > cap for n in counts.values()) else f"{total:,}"


def _instance_context(inst: Instance) -> dict[str, Any]:
    svc = services.get()
    queries = svc.queries
    events = queries.timeline(inst.id)
    defn = _definition(inst)
    duplicates = queries.duplicates_absorbed(idempotency_keys(inst))
    allowed = svc.operations.allowed(inst) if defn is not None else []
    durations = queries.recent_step_durations(inst.saga_name, CHART_RUNS)
    return {
        "inst": inst,
        "defn": defn,
        "steps": build_steps(inst, events, duplicates, defn),
        "events": events,
        "dead_letters": queries.dead_letters(saga_id=inst.id, open_only=False),
        "actions": queries.operator_actions(saga_id=inst.id),
        "action_results": queries.action_results(inst.id),
        "allowed": allowed if current_user.can(Role.OPERATOR) else [],
        "stuck_since": queries.stuck_since(inst.id),
        "charts": step_charts(inst, durations, now_ms()),
        "labels": describe.LABELS,
        "side": describe.side(inst),
        "poll_seconds": int(current_app.config["SAGA_INSTANCE_POLL_SECONDS"]),
        "choreo_actions": _choreo_actions(inst),
        "open_waits": _open_waits(inst, defn),
    }


def _confirm_context(inst: Instance, action: Action, form: ActionForm) -> dict[str, Any]:
    return {
        "inst": inst,
        "form": form,
        "label": describe.LABELS[action],
        "consequence": describe.consequence(action, inst),
        "post_to": url_for("sagas.act", saga_id=inst.id, action_name=action.value),
        "dangerous": action in (Action.CANCEL, Action.COMPENSATE),
        "example_reason": "e.g. payment provider outage is over (INC-1234)",
    }


def _definition(inst: Instance) -> Saga | None:
    # The console may not load every saga's module (SAGA_APP); it still shows
    # the instance, without actions.
    try:
        return services.get().engine.registry.get(inst.saga_name, inst.saga_version)
    except UnknownSaga:
        return None


def _check_allowed(inst: Instance, action: Action) -> None:
    _check_definition(inst)
    if action not in services.get().operations.allowed(inst):
        raise InvalidTransition(inst.id, str(action), inst.state, "its state does not allow it now")


def _check_definition(inst: Instance) -> None:
    if _definition(inst) is None:
        raise UnknownSaga(
            f"{inst.saga_name} v{inst.saga_version}", services.get().engine.registry.names()
        )


# -- signals to waiting steps ---------------------------------------------------


def _open_waits(inst: Instance, defn: Saga | None) -> list[OpenWait]:
    if defn is None or not current_user.can(Role.OPERATOR):
        return []
    return services.get().signals.open_waits(inst)


@bp.route("/sagas/<saga_id>/signals/<event>", methods=["GET", "POST"])
@require_role(Role.OPERATOR)
def send_signal(saga_id: str, event: str) -> ResponseReturnValue:
    """GET: the form for the signal ``event``. POST: deliver it as the operator, audited."""
    svc = services.get()
    inst = svc.engine.get(saga_id)
    form = SignalForm()
    if request.method == "GET":
        check_seen_version(inst, request.args.get("version"))
        _check_definition(inst)
        form.expected_version.data = inst.version
        carried = bring_back(form)
        return _signal_page(inst, event, form, svc.signals.open_wait(inst, event), carried=carried)
    if not form.validate_on_submit():
        return _signal_page(inst, event, form, _wait_for(inst, event)), 400
    try:
        delivered = svc.signals.send(
            saga_id,
            event,
            form.signal_data.data,
            sent_by=current_user.name,
            reason=form.reason.data,
            expected_version=form.expected_version.data,
            origin=Origin.console(current_user.name),
        )
    except (InvalidInput, InvalidTransition) as exc:
        # Refused, nothing written: the form again, with everything the operator typed.
        status = 400 if isinstance(exc, InvalidInput) else 409
        return _signal_page(inst, event, form, _wait_for(inst, event), problem=str(exc)), status
    flash(_signal_sent(event, delivered.taken, delivered.instance))
    return redirect(url_for("sagas.instance", saga_id=saga_id))


def _signal_page(
    inst: Instance,
    event: str,
    form: SignalForm,
    wait: OpenWait | None,
    problem: str = "",
    *,
    carried: bool = False,
) -> str:
    return render_template(
        "confirm_signal.html",
        inst=inst,
        event=event,
        form=form,
        label=describe.SEND_SIGNAL,
        consequence=describe.signal_consequence(wait) if wait is not None else "",
        problem=problem,
        carried=carried,
    )


def _wait_for(inst: Instance, event: str) -> OpenWait | None:
    """The wait for ``event`` if it can still take a signal (a form shown again may be moot)."""
    if _definition(inst) is None:
        return None
    return next((w for w in services.get().signals.open_waits(inst) if w.event == event), None)


def _signal_sent(event: str, taken: bool, inst: Instance) -> str:
    who = f"Signal “{event}” sent by {current_user.name}."
    if taken:
        return f"{who} The step took it; the saga is {inst.state} (version {inst.version})."
    return f"{who} It is stored: the step takes it when it begins waiting."


# -- choreographed instances -----------------------------------------------------

#: What each action on a choreographed instance is called, and what it will do.
CHOREO_ACTIONS = {
    "force-compensate": (
        "Force-compensate",
        "The compensating event of each step that completed and is not undone is published, "
        "latest step first, each once however often this is confirmed; the services that own "
        "the steps undo their work when they see it.",
    ),
    "republish": (
        "Re-publish the last event",
        "The last event this saga moved on is published again with the same id: services that "
        "handled it already absorb it; one that missed it acts on it now.",
    ),
}


def _choreo_actions(inst: Instance) -> list[str]:
    if inst.kind != CHOREOGRAPHED or inst.state.is_final or not current_user.can(Role.OPERATOR):
        return []
    return list(CHOREO_ACTIONS)


@bp.route("/sagas/<saga_id>/choreography/<action_name>", methods=["GET", "POST"])
@require_role(Role.OPERATOR)
def choreo_act(saga_id: str, action_name: str) -> ResponseReturnValue:
    """GET: confirm. POST: force-compensate or re-publish, with a reason, audited."""
    if action_name not in CHOREO_ACTIONS:
        raise InvalidTransition(saga_id, action_name, "-", "no such action on a choreography")
    inst = services.get().engine.get(saga_id)
    form = ActionForm()
    context = _choreo_context(inst, action_name, form)
    if request.method == "GET":
        check_seen_version(inst, request.args.get("version"))
        form.expected_version.data = inst.version
        return render_template("confirm.html", **context, carried=bring_back(form))
    if not form.validate_on_submit():
        return render_template("confirm.html", **context), 400
    check_seen_version(inst, str(form.expected_version.data))
    ops = services.get().choreography
    who = {
        "actor": current_user.name,
        "reason": form.reason.data,
        "origin": Origin.console(current_user.name),
    }
    if action_name == "force-compensate":
        sent = ops.force_compensate(saga_id, **who)
        what = ", ".join(sent) if sent else "nothing new (each was published before)"
        flash(f"Force-compensate: done by {current_user.name}. Published: {what}.")
    else:
        sent_one = ops.republish_last(saga_id, **who)
        flash(f"Re-published {sent_one}: done by {current_user.name}.")
    return redirect(url_for("sagas.instance", saga_id=saga_id))


def _choreo_context(inst: Instance, action_name: str, form: ActionForm) -> dict[str, Any]:
    label, consequence = CHOREO_ACTIONS[action_name]
    return {
        "inst": inst,
        "form": form,
        "label": label,
        "consequence": consequence,
        "post_to": url_for("sagas.choreo_act", saga_id=inst.id, action_name=action_name),
        "dangerous": action_name == "force-compensate",
        "example_reason": "e.g. shipping lost the order (INC-1234)",
    }
