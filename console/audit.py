"""The audit log: every operator action, newest first, filterable, append-only.

The console only reads it; entries are written by the operations API in the
same transaction as the action they record. Each shows who the caller said
acts (the actor, a claim) and the door it came through (its origin).
"""

from __future__ import annotations

from flask import Blueprint, render_template, request
from flask.typing import ResponseReturnValue

from console import services
from console.params import parse_audit
from engine.operations import AUDIT_ACTIONS, OriginKind

bp = Blueprint("audit", __name__)

PAGE_SIZE = 50


@bp.get("/audit")
def audit_log() -> ResponseReturnValue:
    query = parse_audit(request.args)
    rows = services.get().queries.operator_actions(
        saga_id=query.saga_id,
        actor=query.actor,
        action=query.action,
        limit=PAGE_SIZE + 1,
        before_id=query.before_id,
        origin=query.origin,
    )
    next_before = rows[PAGE_SIZE - 1].id if len(rows) > PAGE_SIZE else None
    return render_template(
        "audit.html",
        rows=rows[:PAGE_SIZE],
        query=query,
        next_before=next_before,
        action_names=list(AUDIT_ACTIONS),
        origin_names=[str(kind) for kind in OriginKind],
    )
