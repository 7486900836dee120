"""``/healthz``: is the console up and can it read the store? No login needed."""

from __future__ import annotations

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from console import services
from console.services import DatabaseError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    try:
        services.get().queries.list_instances(limit=1)
    except DatabaseError as exc:
        # Report, don't raise: a load balancer wants a 503, not a traceback page.
        current_app.logger.warning("health check: the store is unreachable: %s", exc.orig)
        return {"status": "unavailable", "store": "unreachable"}, 503
    return {"status": "ok", "store": "ok"}
