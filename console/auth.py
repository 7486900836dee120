"""Sign-in, sign-out, roles, and the admin's users page.

Every endpoint needs a signed-in user except those in :data:`PUBLIC_ENDPOINTS`;
the check runs before every request, so a new view is protected by default.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import LoginManager, current_user, login_user, logout_user
from flask_wtf.csrf import CSRFProtect

from console import services
from console.forms import AddUserForm, LoginForm, PostForm, RoleForm
from console.htmx import make_response, request
from console.ratelimit import LoginThrottle
from console.services import Role, User
from engine.errors import InvalidInput

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
csrf = CSRFProtect()

#: Endpoints anyone may reach: the sign-in page, the health check, static files, and the
#: Prometheus scrape (which asks for its own bearer token when SAGA_METRICS_TOKEN is set).
PUBLIC_ENDPOINTS = frozenset({"auth.login", "health.healthz", "static", "metrics.scrape"})

F = TypeVar("F", bound=Callable[..., ResponseReturnValue])

# The longest page to return to after sign-in: a URL a browser and a proxy keep.
_MAX_NEXT = 2000


class ConsoleUser:
    """A signed-in user as Flask-Login sees it."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, user: User) -> None:
        self.user = user

    @property
    def is_active(self) -> bool:
        return self.user.active

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def role(self) -> Role:
        return self.user.role

    def can(self, needed: Role) -> bool:
        return self.user.role.allows(needed)

    def get_id(self) -> str:
        return str(self.user.id)


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    csrf.init_app(app)
    login_manager.user_loader(_load_user)
    app.before_request(_require_login)


def _load_user(user_id: str) -> ConsoleUser | None:
    if not user_id.isdigit():
        return None
    user = services.get().users.get(int(user_id))
    # A disabled user's session ends at their next request.
    return ConsoleUser(user) if user is not None and user.active else None


def _require_login() -> ResponseReturnValue | None:
    if request.endpoint in PUBLIC_ENDPOINTS or current_user.is_authenticated:
        return None
    login = url_for("auth.login", next=_safe_next(request.full_path))
    if request.htmx:
        # An htmx poll after the session ended: send the whole page to sign-in.
        return make_response("", 401, redirect=login)
    return redirect(login)


def require_role(needed: Role) -> Callable[[F], F]:
    """View decorator: 403 unless the signed-in user's role includes ``needed``."""

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            if not current_user.can(needed):
                abort(
                    403,
                    f"This needs the {needed} role; you are signed in as "
                    f"{current_user.name} ({current_user.role}).",
                )
            return view(*args, **kwargs)

        return cast(F, wrapped)

    return decorate


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
        return render_template("login.html", form=form)
    if not form.validate_on_submit():
        return render_template("login.html", form=form), 400
    throttle = LoginThrottle(
        services.get().users,
        int(current_app.config["SAGA_LOGIN_MAX_FAILURES"]),
        float(current_app.config["SAGA_LOGIN_WINDOW_SECONDS"]),
    )
    key = f"{form.name.data.strip().lower()}|{request.remote_addr}"
    wait = throttle.retry_after(key)
    if wait > 0:
        message = (
            f"Too many failed sign-ins for this name from your address; "
            f"try again in {int(wait // 60) + 1} minute(s)."
        )
        return render_template("login.html", form=form, error=message), 429
    user = services.get().users.authenticate(form.name.data, form.password.data)
    if user is None:
        throttle.failed(key)
        return render_template(
            "login.html", form=form, error="Wrong user name or password, or the user is disabled."
        ), 401
    throttle.succeeded(key)
    session.clear()  # a fresh session on sign-in: no fixation of an earlier one
    login_user(ConsoleUser(user))
    current_app.logger.info("user %s signed in from %s", user.name, request.remote_addr)
    return redirect(_safe_next(form.next.data) or url_for("sagas.list_instances"))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    if not PostForm().validate_on_submit():
        abort(400, "The sign-out form was incomplete; use the Sign out button.")
    logout_user()
    session.clear()
    flash("Signed out.")
    return redirect(url_for("auth.login"))


@bp.get("/users")
@require_role(Role.ADMIN)
def users() -> ResponseReturnValue:
    return _users_page(AddUserForm())


@bp.post("/users")
@require_role(Role.ADMIN)
def add_user() -> ResponseReturnValue:
    form = AddUserForm()
    if not form.validate_on_submit():
        return _users_page(form), 400
    user = services.get().users.add(
        form.name.data, form.password.data, form.role.data, created_by=current_user.name
    )
    current_app.logger.info("admin %s added user %s (%s)", current_user.name, user.name, user.role)
    flash(f"Added {user.name} as {user.role}.")
    return redirect(url_for("auth.users"))


@bp.post("/users/<name>/role")
@require_role(Role.ADMIN)
def set_role(name: str) -> ResponseReturnValue:
    form = RoleForm()
    if not form.validate_on_submit():
        raise InvalidInput("role", "choose one of " + ", ".join(r.value for r in Role))
    user = services.get().users.set_role(name, form.role.data, actor=current_user.name)
    current_app.logger.info("admin %s made %s %s", current_user.name, user.name, user.role)
    flash(f"{user.name} is now {user.role}.")
    return redirect(url_for("auth.users"))


@bp.post("/users/<name>/<any(disable, enable):change>")
@require_role(Role.ADMIN)
def set_disabled(name: str, change: str) -> ResponseReturnValue:
    if not PostForm().validate_on_submit():
        abort(400, "The form was incomplete; use the buttons on the users page.")
    user = services.get().users.set_disabled(name, change == "disable", actor=current_user.name)
    current_app.logger.info("admin %s %sd user %s", current_user.name, change, user.name)
    flash(f"{user.name} is {'disabled' if user.disabled else 'enabled'}.")
    return redirect(url_for("auth.users"))


def _users_page(form: AddUserForm) -> str:
    return render_template(
        "users.html",
        form=form,
        users=services.get().users.list_users(),
        changes=services.get().users.recent_changes(),
        role_form=RoleForm(),
        post_form=PostForm(),
        roles=list(Role),
    )


def _safe_next(target: str | None) -> str | None:
    """``target`` if it is a path on this site, else None (no open redirects)."""
    if not target or len(target) > _MAX_NEXT:
        return None
    # One leading slash and no backslash (browsers read it as a slash): a path, not
    # another host. No control character: CR and LF cannot go in a Location header.
    if not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or not target.isprintable():
        return None
    parts = urlsplit(target)  # cannot raise now: only a host part ("//[") makes it
    if parts.scheme or parts.netloc:
        return None
    return target.rstrip("?")
