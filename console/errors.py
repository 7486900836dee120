"""Every error the console answers, mapped in one place to a status and a page.

Engine errors map as the design says: not found 404, bad input 400, a state
that does not allow the action or a version conflict 409. Each page says
what was wrong and what to do; none shows a traceback.
"""

from __future__ import annotations

from flask import Flask, current_app, render_template, request
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from console import auth, services
from console.services import DatabaseError
from engine.errors import (
    ConcurrencyConflict,
    InvalidInput,
    InvalidTransition,
    SagaNotFound,
    UnknownSaga,
)

_TITLES = {
    400: "Bad request",
    401: "Sign in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    429: "Too many requests",
    500: "Server error",
    503: "Store unavailable",
}


def init_app(app: Flask) -> None:
    app.register_error_handler(CSRFError, _csrf)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(SagaNotFound, _not_found)
    app.register_error_handler(InvalidInput, _invalid_input)
    app.register_error_handler(InvalidTransition, _invalid_transition)
    app.register_error_handler(UnknownSaga, _unknown_saga)
    app.register_error_handler(ConcurrencyConflict, _conflict)
    app.register_error_handler(DatabaseError, _store_down)


def error_page(
    status: int, message: str, title: str | None = None, *, bare: bool = False
) -> ResponseReturnValue:
    """The error page; ``bare`` leaves out the signed-in chrome (it needs the store)."""
    return render_template(
        "error.html",
        status=status,
        title=title or _TITLES.get(status, "Error"),
        message=message,
        bare=bare,
    ), status


def _http(exc: HTTPException) -> ResponseReturnValue:
    status = exc.code or 500
    if status == 500:
        return error_page(500, "Something broke on our side; the error is in the console's log.")
    return error_page(status, exc.description or _TITLES.get(status, "Error"))


def _csrf(exc: CSRFError) -> ResponseReturnValue:
    if request.endpoint == "auth.login":
        return auth.login_form_refused(exc)  # the sign-in page, saying why
    return error_page(
        400,
        f"The form could not be trusted ({exc.description}). Reload the "
        "page and submit it again; nothing was changed.",
        "Form expired or tampered",
    )


def _not_found(exc: SagaNotFound) -> ResponseReturnValue:
    return error_page(
        404,
        f"No saga instance has the id {exc.saga_id!r}. Check the id, or "
        "use the search box with a correlation id or business key.",
    )


def _invalid_input(exc: InvalidInput) -> ResponseReturnValue:
    return error_page(400, f"{exc}. Nothing was changed.")


def _invalid_transition(exc: InvalidTransition) -> ResponseReturnValue:
    return error_page(
        409,
        f"{exc}. Nothing was applied; reload the saga to see what it allows now.",
        "Not allowed in this state",
    )


def _unknown_saga(exc: UnknownSaga) -> ResponseReturnValue:
    return error_page(
        409,
        f"This console does not have the definition of saga {exc.name}, so "
        "it cannot act on it. Start the console with SAGA_APP naming the "
        "module that defines it. Nothing was applied.",
        "Saga definition not loaded",
    )


def _conflict(exc: ConcurrencyConflict) -> ResponseReturnValue:
    svc = services.get()
    try:
        current = svc.engine.get(exc.saga_id)
    except SagaNotFound:
        current = None
    events = svc.queries.timeline(exc.saga_id)[-10:] if current is not None else []
    return render_template(
        "conflict.html", exc=exc, inst=current, events=list(reversed(events)), seen=exc.expected
    ), 409


def _store_down(exc: DatabaseError) -> ResponseReturnValue:
    current_app.logger.error("store error on %s", request.path, exc_info=exc)
    return error_page(
        503,
        "The console cannot reach the saga store right now. Try again in a "
        "moment; if it persists, check the database.",
        bare=True,
    )
