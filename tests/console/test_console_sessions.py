"""Sessions end when they should: sign-out, a password change, a forced reset, disabling.

Also what a user sees around them: changing one's own password, an admin's
forced reset, secure cookies over plain HTTP, and a session that ended while
an operator was typing a reason (sign-in brings it back, and never sends the
browser to a page that only takes a POST, nor off the site).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import SagaEngine, SagaState
from tests.console.console_sagas import SCRIPT
from tests.console.support import PASSWORD, dead_lettered, make_app, sign_in, text

COOKIE = "saga_console"
NEW_PASSWORD = "a brand new passphrase"


def _cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    return cookie.value


def _with_cookie(app: Flask, value: str) -> FlaskClient:
    """Another browser, holding a copy of a session cookie."""
    client = app.test_client()
    client.set_cookie(COOKIE, value)
    return client


class TestSessionsEnd:
    def test_a_cookie_copied_before_sign_out_does_not_work_after_it(
        self, app: Flask, viewer: FlaskClient
    ) -> None:
        copied = _cookie(viewer)
        assert _with_cookie(app, copied).get("/sagas").status_code == 200
        assert viewer.post("/logout").status_code == 302
        response = _with_cookie(app, copied).get("/sagas")
        assert response.status_code == 302
        assert response.location.startswith("/login")

    def test_sign_out_ends_every_session_of_that_user_only(self, app: Flask) -> None:
        laptop = sign_in(app.test_client(), "viewer")
        phone = sign_in(app.test_client(), "viewer")
        other = sign_in(app.test_client(), "operator")
        laptop.post("/logout")
        assert phone.get("/sagas").status_code == 302
        assert other.get("/sagas").status_code == 200

    def test_disabling_ends_sessions_for_good_even_once_enabled_again(
        self, app: Flask, viewer: FlaskClient
    ) -> None:
        users = app.extensions["saga"].users
        users.set_disabled("viewer", True)
        users.set_disabled("viewer", False)
        assert viewer.get("/sagas").status_code == 302
        sign_in(viewer, "viewer")
        assert viewer.get("/sagas").status_code == 200

    def test_a_password_set_by_an_admin_ends_every_session(
        self, app: Flask, viewer: FlaskClient
    ) -> None:
        app.extensions["saga"].users.set_password("viewer", NEW_PASSWORD, actor="cli:root")
        assert viewer.get("/sagas").status_code == 302

    def test_a_session_from_before_epochs_or_a_forged_id_is_signed_out(
        self, app: Flask, viewer: FlaskClient
    ) -> None:
        for forged in ("1", "1:x", "x:0", "1:99", "1:0:0", "\u0661:0"):
            with viewer.session_transaction() as session:
                session["_user_id"] = forged
            assert viewer.get("/sagas").status_code == 302, forged


class TestChangeMyPassword:
    def _change(
        self, client: FlaskClient, current: str, new: str, again: str | None = None
    ) -> object:
        form = {
            "current_password": current,
            "new_password": new,
            "confirm_password": new if again is None else again,
        }
        return client.post("/account/password", data=form)

    def test_every_page_links_to_it(self, viewer: FlaskClient) -> None:
        assert 'href="/account/password"' in text(viewer.get("/sagas"))
        assert "Current password" in text(viewer.get("/account/password"))

    def test_changes_it_keeps_this_session_and_ends_the_others(
        self, app: Flask, viewer: FlaskClient
    ) -> None:
        elsewhere = sign_in(app.test_client(), "viewer")
        response = self._change(viewer, PASSWORD, NEW_PASSWORD)
        assert response.status_code == 302  # type: ignore[attr-defined]
        assert viewer.get("/sagas").status_code == 200
        assert elsewhere.get("/sagas").status_code == 302
        assert (
            app.test_client()
            .post("/login", data={"name": "viewer", "password": PASSWORD})
            .status_code
            == 401
        )
        sign_in(app.test_client(), "viewer", NEW_PASSWORD)
        change = app.extensions["saga"].users.recent_changes()[0]
        assert (change.actor, change.action, change.user_name) == (
            "viewer",
            "set_password",
            "viewer",
        )

    @pytest.mark.parametrize(
        ("current", "new", "again", "status", "says"),
        [
            ("wrong password", NEW_PASSWORD, None, 401, "current password is wrong"),
            (PASSWORD, NEW_PASSWORD, "something else", 400, "two new passwords differ"),
            (PASSWORD, "short", None, 400, "New password"),
            (PASSWORD, PASSWORD, None, 400, "same as the current one"),
        ],
    )
    def test_refuses_and_changes_nothing(
        self,
        app: Flask,
        viewer: FlaskClient,
        current: str,
        new: str,
        again: str | None,
        status: int,
        says: str,
    ) -> None:
        response = self._change(viewer, current, new, again)
        assert response.status_code == status  # type: ignore[attr-defined]
        assert says in text(response)
        assert viewer.get("/sagas").status_code == 200
        sign_in(app.test_client(), "viewer", PASSWORD)

    def test_wrong_current_passwords_are_rate_limited_like_sign_in(
        self, viewer: FlaskClient
    ) -> None:
        for _ in range(5):
            assert self._change(viewer, "nope nope", NEW_PASSWORD).status_code == 401  # type: ignore[attr-defined]
        blocked = self._change(viewer, PASSWORD, NEW_PASSWORD)
        assert blocked.status_code == 429  # type: ignore[attr-defined]
        assert "Too many failed sign-ins" in text(blocked)


class TestForcedReset:
    def test_an_admin_forces_a_reset_which_ends_the_users_sessions(
        self, app: Flask, admin: FlaskClient, viewer: FlaskClient
    ) -> None:
        response = admin.post("/users/viewer/reset")
        assert response.status_code == 302
        assert "must choose a new password" in text(admin.get("/users"))
        assert viewer.get("/sagas").status_code == 302
        change = app.extensions["saga"].users.recent_changes()[0]
        assert (change.actor, change.action, change.user_name) == ("admin", "force_reset", "viewer")

    def test_the_user_must_choose_a_new_password_before_anything_else(
        self, app: Flask, admin: FlaskClient
    ) -> None:
        admin.post("/users/viewer/reset")
        client = app.test_client()
        signed_in = client.post("/login", data={"name": "viewer", "password": PASSWORD})
        assert signed_in.location == "/account/password"
        for page in ("/sagas", "/audit", "/dead-letters"):
            assert client.get(page).location == "/account/password"
        polled = client.get("/sagas", headers={"HX-Request": "true"})
        assert polled.headers["HX-Redirect"] == "/account/password"
        assert "An admin asked you to choose a new password" in text(
            client.get("/account/password")
        )
        client.post(
            "/account/password",
            data={
                "current_password": PASSWORD,
                "new_password": NEW_PASSWORD,
                "confirm_password": NEW_PASSWORD,
            },
        )
        assert client.get("/sagas").status_code == 200
        assert app.extensions["saga"].users.by_name("viewer").must_change_password is False

    def test_only_admins_force_a_reset(self, operator: FlaskClient, app: Flask) -> None:
        assert operator.post("/users/viewer/reset").status_code == 403
        assert app.extensions["saga"].users.by_name("viewer").must_change_password is False


class TestSecureCookiesOverPlainHttp:
    @pytest.fixture
    def app(self, saga_engine: SagaEngine) -> Flask:
        return make_app(
            saga_engine,
            WTF_CSRF_ENABLED=True,
            SESSION_COOKIE_SECURE=True,
            REMEMBER_COOKIE_SECURE=True,
        )

    def _token(self, html: str) -> str:
        found = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)
        assert found is not None
        return found.group(1)

    def test_the_sign_in_page_over_plain_http_logs_a_warning_naming_the_setting(
        self, app: Flask, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING):
            assert app.test_client().get("/login").status_code == 200
        assert any(
            "SAGA_CONSOLE_SECURE_COOKIES" in r.getMessage() and r.levelno == logging.WARNING
            for r in caplog.records
        )

    def test_a_sign_in_whose_cookie_was_not_kept_says_so_not_form_expired(
        self, app: Flask, caplog: pytest.LogCaptureFixture
    ) -> None:
        token = self._token(text(app.test_client().get("/login")))
        browser = app.test_client()  # the browser that dropped the Secure cookie over HTTP
        with caplog.at_level(logging.WARNING):
            response = browser.post(
                "/login", data={"name": "viewer", "password": PASSWORD, "csrf_token": token}
            )
        assert response.status_code == 400
        assert "only keeps its sign-in cookie over HTTPS" in text(response)
        assert "Form expired or tampered" not in text(response)
        assert any("SAGA_CONSOLE_SECURE_COOKIES" in r.getMessage() for r in caplog.records)

    def test_a_stale_form_whose_cookie_came_back_is_not_blamed_on_http(self, app: Flask) -> None:
        browser = app.test_client()
        browser.get("/login")  # the test client keeps the cookie: this browser did
        response = browser.post(
            "/login", data={"name": "viewer", "password": PASSWORD, "csrf_token": "stale"}
        )
        assert response.status_code == 400
        assert "could not be trusted" in text(response)
        assert "only keeps its sign-in cookie" not in text(response)

    def test_over_https_nothing_is_said_and_sign_in_works(
        self, app: Flask, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = app.test_client()
        with caplog.at_level(logging.WARNING):
            page = text(client.get("/login", base_url="https://localhost"))
            response = client.post(
                "/login",
                base_url="https://localhost",
                headers={"Referer": "https://localhost/login"},
                data={"name": "viewer", "password": PASSWORD, "csrf_token": self._token(page)},
            )
        assert "only keeps its sign-in cookie" not in page
        assert response.status_code == 302
        assert not [r for r in caplog.records if "SAGA_CONSOLE_SECURE_COOKIES" in r.getMessage()]


class TestAfterASessionEnded:
    def _end_sessions(self, app: Flask, name: str) -> None:
        users = app.extensions["saga"].users
        users.end_sessions(users.by_name(name).id)

    def test_the_typed_reason_comes_back_after_signing_in_again(
        self, app: Flask, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        reason = f"customer called back {SCRIPT} (INC-77)"
        self._end_sessions(app, "operator")  # e.g. signed out in another tab
        posted = operator.post(
            f"/sagas/{inst.id}/actions/cancel",
            data={"reason": reason, "expected_version": inst.version},
        )
        assert posted.status_code == 302
        assert saga_engine.get(inst.id).state is SagaState.FAILED  # nothing applied
        target = parse_qs(urlsplit(posted.location).query)["next"][0]
        assert target.startswith(f"/sagas/{inst.id}/actions/cancel?")
        login_page = text(operator.get(posted.location))
        assert "<script>alert" not in login_page
        back = operator.post(
            "/login", data={"name": "operator", "password": PASSWORD, "next": target}
        )
        assert back.location == target
        page = text(operator.get(back.location))
        assert (
            "customer called back &lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt; (INC-77)"
            in page
        )
        assert "<script>alert" not in page
        assert "check it, then confirm again" in page

    def test_with_csrf_on_a_form_posted_without_a_session_goes_to_sign_in(
        self, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        app = make_app(saga_engine, WTF_CSRF_ENABLED=True)
        stale = app.test_client()  # its session is gone: no cookie, so no CSRF token either
        posted = stale.post(
            f"/dead-letters/{inst.id}/resolve?back=instance",
            data={"reason": "done by hand", "expected_version": inst.version, "csrf_token": "x"},
        )
        assert posted.status_code == 302
        target = parse_qs(urlsplit(posted.location).query)["next"][0]
        assert parse_qs(urlsplit(target).query) == {
            "back": ["instance"],
            "reason": ["done by hand"],
        }
        assert saga_engine.get(inst.id).state is SagaState.FAILED

    def test_a_carried_reason_the_form_would_refuse_is_refused(
        self, operator: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        inst = dead_lettered(saga_engine)
        response = operator.get(f"/sagas/{inst.id}/actions/cancel?reason=a%00b")
        assert response.status_code == 400
        assert "reason" in text(response)

    @pytest.mark.parametrize(
        "target",
        [
            "/logout",
            "/users/viewer/disable",
            "/users/viewer/reset",
            "/login",
            "/static/console.css",
        ],
    )
    def test_sign_in_never_returns_to_a_post_only_or_session_page(
        self, anon: FlaskClient, target: str
    ) -> None:
        assert f'value="{target}"' not in text(anon.get(f"/login?next={target}"))
        response = anon.post("/login", data={"name": "admin", "password": PASSWORD, "next": target})
        assert response.location == "/sagas"

    def test_a_post_only_action_returns_to_the_page_it_came_from(self, anon: FlaskClient) -> None:
        response = anon.post(
            "/users/viewer/disable", headers={"Referer": "http://localhost/users?x=1"}
        )
        assert parse_qs(urlsplit(response.location).query)["next"] == ["/users?x=1"]
        offsite = anon.post("/logout", headers={"Referer": "http://evil.example/users"})
        assert offsite.location == "/login"


class TestFavicon:
    def test_pages_link_an_icon_that_is_served(self, viewer: FlaskClient) -> None:
        html = text(viewer.get("/sagas"))
        found = re.search(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)">', html)
        assert found is not None
        with viewer.get(found.group(1)) as icon:
            assert icon.status_code == 200
            assert icon.mimetype == "image/svg+xml"

    def test_favicon_ico_needs_no_sign_in(self, anon: FlaskClient) -> None:
        response = anon.get("/favicon.ico")
        assert response.status_code == 301
        assert response.location.endswith("/static/favicon.svg")
