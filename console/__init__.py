"""The operator console: a Flask + htmx client of the engine's operations and queries.

``create_app()`` is the factory (``gunicorn 'console:create_app()'``); the
blueprints are one per area (auth, sagas, dead letters, entries set aside
on the poison stream, bulk recovery, step-duration charts, audit, health).
Views parse input, call :mod:`engine.operations` (writes), :mod:`engine.queries`
(reads) and the facades :mod:`console.services` builds once, at start-up, and
render templates; which engine modules they may import is written down in
:mod:`console.services`. htmx requests and responses go through htmx-flask
(:mod:`console.htmx`).

Templates and static files (htmx among them) load through the package,
``importlib.resources.files("console")``: the wheel holds them in the package,
and an editable install links them there from the top-level ``templates/``
and ``static/`` folders (hatch_build.py), so a checkout runs the same way.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from flask import Flask, Response
from werkzeug.middleware.proxy_fix import ProxyFix

import console.account
import console.audit
import console.auth
import console.bulk
import console.charts
import console.deadletters
import console.errors
import console.formatting
import console.health
import console.htmx
import console.metrics
import console.params
import console.poison
import console.sagas
import console.services
from engine import __version__
from engine.inputs import parse_int

__all__ = ["create_app"]


def _packaged(folder: str) -> Path:
    # Flask serves and renders from directories, so the package must sit on disk
    # (an installed wheel or a checkout do; a zip import would not).
    return Path(str(files(__name__) / folder))


TEMPLATES = _packaged("templates")
STATIC = _packaged("static")
HTMX = STATIC / "vendor" / "htmx.min.js"

log = logging.getLogger(__name__)

# The pages use no inline script or style, so the browser may refuse both:
# if escaping were ever missed, an injected <script> still would not run.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the console. ``test_config`` overrides settings (and may pass ``SAGA_ENGINE``)."""
    _check_packaged_files()
    app = Flask(__name__, template_folder=str(TEMPLATES), static_folder=str(STATIC))
    app.config.from_mapping(_settings_from_env())
    if test_config is not None:
        app.config.from_mapping(test_config)
    _ensure_secret_key(app)
    _trust_proxies(app)
    console.htmx.Htmx(app)
    console.services.init_app(app)
    console.auth.init_app(app)
    console.params.init_app(app)  # after the sign-in check: anonymous requests go to sign in
    console.errors.init_app(app)
    console.formatting.init_app(app)
    for blueprint in (console.auth.bp, console.account.bp, console.sagas.bp, console.audit.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(console.health.bp)
    console.bulk.init_app(app)
    for area in (console.deadletters.bp, console.poison.bp, console.bulk.bp, console.charts.bp):
        app.register_blueprint(area)
    app.register_blueprint(console.metrics.bp)
    app.add_url_rule("/", "index", console.sagas.index)
    app.after_request(_security_headers)
    app.jinja_env.globals["htmx_available"] = HTMX.is_file()
    app.jinja_env.globals["saga_version"] = __version__
    if not HTMX.is_file():
        log.warning(
            "%s is missing (run `make setup`); the console works, but without live refresh",
            HTMX,
        )
    return app


def _check_packaged_files() -> None:
    # Without its templates every page would answer 500; say why once, at start-up.
    if not TEMPLATES.is_dir() or not STATIC.is_dir():
        raise RuntimeError(
            f"the console package has no templates/ or static/ at {TEMPLATES.parent}: "
            "install the wheel, or in a checkout run `make setup` (pip install -e . links them in)"
        )


def _settings_from_env() -> dict[str, Any]:
    secure = os.environ.get("SAGA_CONSOLE_SECURE_COOKIES", "") in ("1", "true", "yes")
    return {
        "SECRET_KEY": os.environ.get("SAGA_CONSOLE_SECRET_KEY") or None,
        "SESSION_COOKIE_NAME": "saga_console",
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": secure,
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SAMESITE": "Lax",
        "REMEMBER_COOKIE_SECURE": secure,
        "WTF_CSRF_TIME_LIMIT": None,  # the token lives as long as the session
        "SAGA_LOGIN_MAX_FAILURES": 5,
        "SAGA_LOGIN_WINDOW_SECONDS": 300,
        "SAGA_LIST_POLL_SECONDS": 5,
        # Tab counts stop at this many (shown as "10,000+"), so they stay cheap on a big store.
        "SAGA_COUNT_CAP": 10_000,
        "SAGA_INSTANCE_POLL_SECONDS": 2,
        "SAGA_TRUSTED_PROXIES": _proxy_count(os.environ.get("SAGA_CONSOLE_TRUSTED_PROXIES")),
    }


def _proxy_count(raw: str | None) -> int:
    if not raw:
        return 0
    return parse_int("SAGA_CONSOLE_TRUSTED_PROXIES", raw, low=0, high=5)


def _trust_proxies(app: Flask) -> None:
    # Behind N reverse proxies, the client's address is the one the outermost
    # proxy put in X-Forwarded-For; without this, every sign-in would come from
    # the proxy, and the sign-in throttle would count all clients as one.
    # Trust only proxies that are really there: the header is the client's to forge.
    count = int(app.config.get("SAGA_TRUSTED_PROXIES") or 0)
    if count:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=count)  # type: ignore[method-assign]


def _ensure_secret_key(app: Flask) -> None:
    if app.config.get("SECRET_KEY"):
        return
    # A key per process signs sessions correctly, but sessions end when the
    # process restarts and do not carry across several console processes.
    log.warning(
        "SAGA_CONSOLE_SECRET_KEY is not set: using a random key for this process; "
        "sessions end when it restarts and are not shared between processes"
    )
    app.config["SECRET_KEY"] = secrets.token_hex(32)


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response
