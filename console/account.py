"""The signed-in user's own account: changing their password.

The current password is asked for (a session left open on a shared screen is
not enough to take the account over), checked under the sign-in throttle's
key, and on success every other session of the user ends; this browser gets
a fresh session. A user an admin forced to reset comes here first.
"""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from console import services
from console.auth import login_throttle, sign_in_again, too_many
from console.forms import ChangePasswordForm
from console.htmx import request
from console.services import MIN_PASSWORD
from engine.errors import InvalidInput

bp = Blueprint("account", __name__)


@bp.route("/account/password", methods=["GET", "POST"])
def change_password() -> ResponseReturnValue:
    """GET: the form. POST: check the current password, store the new one."""
    form = ChangePasswordForm()
    if request.method == "GET":
        return _page(form)
    if not form.validate_on_submit():
        return _page(form), 400
    throttle, key = login_throttle(current_user.name)
    wait = throttle.retry_after(key)
    if wait > 0:
        return _page(form, too_many(wait)), 429
    try:
        user = services.get().users.change_password(
            current_user.name, form.current_password.data, form.new_password.data
        )
    except InvalidInput as exc:
        return _page(form, f"{exc}."), 400
    if user is None:
        throttle.failed(key)
        return _page(form, "The current password is wrong; nothing was changed."), 401
    throttle.succeeded(key)
    sign_in_again(user)  # the change ended every session, this one too: start a fresh one
    current_app.logger.info("user %s changed their password", user.name)
    flash("Password changed. Every other session of yours has ended.")
    return redirect(url_for("sagas.list_instances"))


def _page(form: ChangePasswordForm, error: str | None = None) -> str:
    return render_template(
        "password.html",
        form=form,
        error=error,
        forced=current_user.must_change_password,
        min_password=MIN_PASSWORD,
    )
