"""Sign-in, sign-out, roles, and the admin's users page.

Every endpoint needs a signed-in user except those in :data:`PUBLIC_ENDPOINTS`;
the check runs before every request, so a new view is protected by default.

A session names the user and the user's session epoch (:mod:`engine.users`);
the user loader refuses a session whose epoch is not the stored one, so
signing out, a password change, a forced reset or disabling the user ends
every session of theirs at once, in every console process.

When a session ended while a form was being filled in, the sign-in page
brings the operator back to the form's page with the reason typed into it
(:func:`return_target`); only a page that answers GET is ever a target.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlencode, urlsplit

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
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from console import services
from console.forms import AddUserForm, LoginForm, PostForm, RoleForm
from console.htmx import make_response, request
from console.ratelimit import LoginThrottle
from console.services import Role, User
from engine.errors import InvalidInput
from engine.operations import MAX_REASON, check_reason

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
csrf = CSRFProtect()

#: Endpoints anyone may reach: the sign-in page, the health check, static files, and the
#: Prometheus scrape (which asks for its own bearer token when SAGA_METRICS_TOKEN is set).
PUBLIC_ENDPOINTS = frozenset(
    {"auth.login", "auth.favicon", "health.healthz", "static", "metrics.scrape"}
)
#: What a user who must choose a new password (an admin forced a reset) may still reach.
RESET_ENDPOINTS = frozenset({"account.change_password", "auth.logout"})
#: Never where a sign-in sends the browser back to, though they answer GET.
NOT_RETURNED_TO = frozenset({"auth.login", "auth.logout", "auth.favicon", "static"})
#: What an operator typed that a sign-in brings back to the form, when the session ended
#: while they typed it: free text they wrote, never a version, a token or a choice.
CARRIED_FIELDS = ("reason",)
#: What the log says, and the sign-in page shows, when secure cookies meet plain HTTP.
INSECURE_TRANSPORT_LOG = (
    "a sign-in request arrived over plain HTTP, but SAGA_CONSOLE_SECURE_COOKIES is on: "
    "browsers that reach the console over HTTP do not keep its session cookie, so their "
    "sign-ins fail. Serve the console over HTTPS; behind a proxy that ends TLS, set "
    "SAGA_CONSOLE_TRUSTED_PROXIES so the console sees its X-Forwarded-Proto"
)
INSECURE_TRANSPORT_MESSAGE = (
    "This console only keeps its sign-in cookie over HTTPS, and this page came over plain "
    "HTTP, so your browser cannot keep it and signing in cannot work. Open the console with "
    "an https:// address, or ask whoever runs it to check SAGA_CONSOLE_SECURE_COOKIES."
)

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

    @property
    def must_change_password(self) -> bool:
        return self.user.must_change_password

    def can(self, needed: Role) -> bool:
        return self.user.role.allows(needed)

    def get_id(self) -> str:
        # The epoch rides in the session: raising the stored one ends this session.
        return f"{self.user.id}:{self.user.session_epoch}"


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    login_manager.user_loader(_load_user)
    # Before the CSRF check: a form posted after its session ended goes to sign-in
    # (nothing is applied), not to "form expired"; sign-in brings back what was typed.
    app.before_request(_require_login)
    csrf.init_app(app)


def _load_user(session_id: str) -> ConsoleUser | None:
    user_id, _, epoch = session_id.partition(":")
    if not (user_id.isascii() and user_id.isdigit() and epoch.isascii() and epoch.isdigit()):
        return None  # a session from before epochs, or forged: sign in again
    if len(user_id) > 18 or len(epoch) > 9:
        return None
    user = services.get().users.get(int(user_id))
    # A disabled user, or a session the user ended (or had ended) elsewhere, is over.
    if user is None or not user.active or user.session_epoch != int(epoch):
        return None
    return ConsoleUser(user)


def _require_login() -> ResponseReturnValue | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if current_user.is_authenticated:
        if current_user.must_change_password and request.endpoint not in RESET_ENDPOINTS:
            return _send_to(url_for("account.change_password"))
        return None
    return _send_to(url_for("auth.login", next=return_target()))


def _send_to(target: str) -> ResponseReturnValue:
    if request.htmx:
        # An htmx poll or form: send the whole page, not a fragment of it.
        return make_response("", 401, redirect=target)
    return redirect(target)


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
    _warn_if_plain_http()
    if request.method == "GET":
        form.next.data = _safe_next(request.args.get("next")) or ""
        return render_template("login.html", form=form)
    if not form.validate_on_submit():
        return render_template("login.html", form=form), 400
    throttle, key = login_throttle(form.name.data)
    wait = throttle.retry_after(key)
    if wait > 0:
        return render_template("login.html", form=form, error=too_many(wait)), 429
    user = services.get().users.authenticate(form.name.data, form.password.data)
    if user is None:
        throttle.failed(key)
        return render_template(
            "login.html", form=form, error="Wrong user name or password, or the user is disabled."
        ), 401
    throttle.succeeded(key)
    sign_in_again(user)
    current_app.logger.info("user %s signed in from %s", user.name, request.remote_addr)
    if user.must_change_password:
        flash("An admin asked you to choose a new password before you go on.")
        return redirect(url_for("account.change_password"))
    return redirect(_safe_next(form.next.data) or url_for("sagas.list_instances"))


def login_throttle(name: str) -> tuple[LoginThrottle, str]:
    """The sign-in throttle and the key it counts ``name``'s failures from this address by.

    Checking a password anywhere (sign-in, changing one's password) counts under the
    same key, so a guesser gets one budget however many doors they try."""
    throttle = LoginThrottle(
        services.get().users,
        int(current_app.config["SAGA_LOGIN_MAX_FAILURES"]),
        float(current_app.config["SAGA_LOGIN_WINDOW_SECONDS"]),
    )
    return throttle, f"{name.strip().lower()}|{request.remote_addr}"


def too_many(wait: float) -> str:
    """What the throttle says to someone it stops, for ``wait`` more seconds."""
    return (
        "Too many failed sign-ins (or password checks) for this name from your address; "
        f"try again in {int(wait // 60) + 1} minute(s)."
    )


def sign_in_again(user: User) -> None:
    """A fresh session for ``user``: nothing of an earlier one carries over (no fixation)."""
    session.clear()
    login_user(ConsoleUser(user))


def login_form_refused(exc: CSRFError) -> ResponseReturnValue:
    """The sign-in page, when the CSRF check refused its form (the error handler calls it)."""
    form = LoginForm()
    form.next.data = _safe_next(request.form.get("next")) or ""
    # No session cookie came back, over plain HTTP, with Secure cookies: the browser
    # dropped the cookie the sign-in page set, and will drop every other one.
    dropped = _warn_if_plain_http() and not request.cookies.get(session_cookie_name())
    message = (
        INSECURE_TRANSPORT_MESSAGE
        if dropped
        else (
            "The sign-in form could not be trusted: it had expired, or your browser did not "
            "send this site's cookie back. Sign in again."
        )
    )
    return render_template("login.html", form=form, error=message), 400


def session_cookie_name() -> str:
    return str(current_app.config["SESSION_COOKIE_NAME"])


def _warn_if_plain_http() -> bool:
    """Log a warning, and say True, when Secure cookies are on and this request is plain HTTP.

    Behind a proxy that ends TLS the request is HTTP here although the browser's is not
    (the cookie is kept then): the warning says to trust the proxy's X-Forwarded-Proto."""
    if not current_app.config.get("SESSION_COOKIE_SECURE") or request.is_secure:
        return False
    current_app.logger.warning(INSECURE_TRANSPORT_LOG)
    return True


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    if not PostForm().validate_on_submit():
        abort(400, "The sign-out form was incomplete; use the Sign out button.")
    # Every session of this user ends, not only this browser's: a copied cookie too.
    services.get().users.end_sessions(current_user.user.id)
    current_app.logger.info("user %s signed out; their sessions ended", current_user.name)
    logout_user()
    session.clear()
    flash("Signed out. Every session of yours has ended.")
    return redirect(url_for("auth.login"))


@bp.get("/favicon.ico")
def favicon() -> ResponseReturnValue:
    """Browsers that ask for /favicon.ico get the SVG icon the pages link to."""
    return redirect(url_for("static", filename="favicon.svg"), 301)


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


@bp.post("/users/<name>/reset")
@require_role(Role.ADMIN)
def force_reset(name: str) -> ResponseReturnValue:
    if not PostForm().validate_on_submit():
        abort(400, "The form was incomplete; use the buttons on the users page.")
    user = services.get().users.force_reset(name, actor=current_user.name)
    current_app.logger.info("admin %s forced a password reset of %s", current_user.name, user.name)
    flash(
        f"{user.name} must choose a new password at their next sign-in; "
        "every session of theirs has ended."
    )
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


def return_target() -> str | None:
    """Where a sign-in should send the browser back to, from this request.

    A GET returns to itself. A form posted after the session ended returns to the
    same address as a GET (the confirmation page the form was on), with the
    :data:`CARRIED_FIELDS` the operator typed, so that signing in again brings
    the reason back; nothing is applied until they confirm once more. A POST to
    an address without a page returns to the page it came from, if on this site.
    """
    if request.method == "GET":
        return _safe_next(request.full_path)
    if _answers_get(request.path):
        kept = [(k, v) for k, v in request.args.items(multi=True) if k != "version"]
        kept += [(f, request.form[f]) for f in CARRIED_FIELDS if _carriable(request.form.get(f))]
        return _safe_next(f"{request.path}?{urlencode(kept)}" if kept else request.path)
    referrer = urlsplit(request.referrer or "")
    if referrer.netloc != request.host:
        return None
    return _safe_next(f"{referrer.path}?{referrer.query}" if referrer.query else referrer.path)


def carried(field: str) -> str | None:
    """Text a sign-in brought back for ``field`` (see :func:`return_target`), or None.

    Refused like the field itself when it would be (400, the field named); shown
    escaped, in the form, for the operator to check and confirm again."""
    value = request.args.get(field)
    if field not in CARRIED_FIELDS or value is None or not value.strip():
        return None
    return check_reason(value)


def bring_back(form: Any) -> bool:
    """Fill ``form``'s carried fields from what a sign-in brought back; True when any was."""
    found = False
    for field in CARRIED_FIELDS:
        value = carried(field)
        if value is not None:
            getattr(form, field).data = value
            found = True
    return found


def _carriable(value: str | None) -> bool:
    return bool(value and value.strip()) and len(value or "") <= MAX_REASON


def _safe_next(target: str | None) -> str | None:
    """``target`` if it is a page on this site that answers GET, else None.

    No open redirects (another host, a scheme, ``//`` or a backslash), and no
    address that only takes a POST (``/logout``) or would end the session again."""
    if not target or len(target) > _MAX_NEXT:
        return None
    # One leading slash and no backslash (browsers read it as a slash): a path, not
    # another host. No control character: CR and LF cannot go in a Location header.
    if not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or not target.isprintable():
        return None
    parts = urlsplit(target)  # cannot raise now: only a host part ("//[") makes it
    if parts.scheme or parts.netloc or not _answers_get(parts.path):
        return None
    return target.rstrip("?")


def _answers_get(path: str) -> bool:
    """True when ``path`` is a page of this console a browser may be sent to."""
    try:
        endpoint, _ = current_app.url_map.bind("localhost").match(path, method="GET")
    except HTTPException:  # not found, GET not allowed, or a redirect to another path
        return False
    return endpoint not in NOT_RETURNED_TO
