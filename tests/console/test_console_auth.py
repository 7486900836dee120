"""Sign-in, sessions, roles and the login rate limit, through the Flask test client."""

from __future__ import annotations

import logging

import pytest
from flask import Flask
from flask.testing import FlaskClient

from console import create_app
from engine import SagaEngine
from tests.console.support import PASSWORD, make_app, sign_in, text

PAGES = [
    "/",
    "/sagas",
    "/sagas?state=failed",
    "/search?q=x",
    "/sagas/some-id",
    "/sagas/some-id/actions/retry",
    "/audit",
    "/users",
]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_sends_anonymous_users_to_sign_in(anon: FlaskClient, path: str) -> None:
    response = anon.get(path)
    assert response.status_code == 302
    assert response.location.startswith("/login?next=")


def test_posts_need_sign_in_too(anon: FlaskClient) -> None:
    response = anon.post("/sagas/some-id/actions/retry", data={"reason": "x"})
    assert response.status_code == 302
    assert response.location.startswith("/login")


@pytest.mark.parametrize("path", ["/login", "/healthz", "/static/console.css"])
def test_sign_in_health_and_static_are_public(anon: FlaskClient, path: str) -> None:
    with anon.get(path) as response:  # a static file response holds the file open
        assert response.status_code == 200


def test_an_htmx_poll_after_the_session_ended_redirects_the_whole_page(anon: FlaskClient) -> None:
    response = anon.get("/sagas", headers={"HX-Request": "true"})
    assert response.status_code == 401
    assert response.headers["HX-Redirect"].startswith("/login?next=")


def test_sign_in_returns_to_the_page_asked_for(anon: FlaskClient) -> None:
    response = anon.post(
        "/login", data={"name": "viewer", "password": PASSWORD, "next": "/audit?actor=bob"}
    )
    assert response.status_code == 302
    assert response.location == "/audit?actor=bob"
    assert anon.get("/audit").status_code == 200


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "evil", "/\\evil.example"]
)
def test_sign_in_never_redirects_off_site(anon: FlaskClient, target: str) -> None:
    response = anon.post("/login", data={"name": "viewer", "password": PASSWORD, "next": target})
    assert response.location == "/sagas"


def test_user_names_are_not_case_sensitive(anon: FlaskClient) -> None:
    sign_in(anon, "  Viewer ")
    assert anon.get("/sagas").status_code == 200


@pytest.mark.parametrize(("name", "password"), [("viewer", "wrong password"), ("nobody", PASSWORD)])
def test_a_wrong_name_or_password_is_refused(anon: FlaskClient, name: str, password: str) -> None:
    response = anon.post("/login", data={"name": name, "password": password})
    assert response.status_code == 401
    assert "Wrong user name or password" in text(response)
    assert anon.get("/sagas").status_code == 302


def test_an_empty_sign_in_form_is_a_bad_request(anon: FlaskClient) -> None:
    assert anon.post("/login", data={}).status_code == 400


def test_failed_sign_ins_are_rate_limited_per_name_and_address(anon: FlaskClient) -> None:
    for _ in range(5):
        assert anon.post("/login", data={"name": "operator", "password": "nope"}).status_code == 401
    blocked = anon.post("/login", data={"name": "operator", "password": PASSWORD})
    assert blocked.status_code == 429
    assert "Too many failed sign-ins" in text(blocked)
    assert anon.get("/sagas").status_code == 302  # the right password did not get through
    sign_in(anon, "viewer")  # another name from the same address is not blocked


@pytest.mark.parametrize("proxies", [0, 1])
def test_behind_a_trusted_proxy_each_client_address_is_limited_on_its_own(
    saga_engine: SagaEngine, proxies: int
) -> None:
    client = make_app(saga_engine, SAGA_TRUSTED_PROXIES=proxies).test_client()

    def attempt(address: str, password: str) -> int:
        form = {"name": "operator", "password": password}
        return client.post("/login", data=form, headers={"X-Forwarded-For": address}).status_code

    for _ in range(5):
        assert attempt("203.0.113.7", "nope") == 401
    other = attempt("198.51.100.2", PASSWORD)
    # Trusted, the header names the client: another address may still sign in.
    # Not trusted, the header is anyone's to forge, and both are the proxy's address.
    assert other == (302 if proxies else 429)


def test_a_disabled_user_cannot_sign_in(app: Flask, anon: FlaskClient) -> None:
    app.extensions["saga"].users.set_disabled("viewer", True)
    response = anon.post("/login", data={"name": "viewer", "password": PASSWORD})
    assert response.status_code == 401


def test_disabling_a_user_ends_their_session(app: Flask, viewer: FlaskClient) -> None:
    assert viewer.get("/sagas").status_code == 200
    app.extensions["saga"].users.set_disabled("viewer", True)
    assert viewer.get("/sagas").status_code == 302


def test_sign_out_ends_the_session(viewer: FlaskClient) -> None:
    response = viewer.post("/logout")
    assert response.status_code == 302
    assert viewer.get("/sagas").status_code == 302


def test_sign_out_is_a_post(viewer: FlaskClient) -> None:
    assert viewer.get("/logout").status_code == 405


@pytest.mark.parametrize(("role", "status"), [("viewer", 403), ("operator", 403), ("admin", 200)])
def test_only_admins_manage_users(app: Flask, role: str, status: int) -> None:
    client = sign_in(app.test_client(), role)
    response = client.get("/users")
    assert response.status_code == status
    if status == 403:
        assert "needs the admin role" in text(response)


def test_session_cookie_is_http_only_and_same_site(anon: FlaskClient) -> None:
    response = anon.post("/login", data={"name": "viewer", "password": PASSWORD})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie


def test_session_cookie_is_secure_when_configured(
    saga_engine: SagaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_CONSOLE_SECURE_COOKIES", "1")
    client = make_app(saga_engine).test_client()
    response = client.post("/login", data={"name": "viewer", "password": PASSWORD})
    assert "Secure" in response.headers["Set-Cookie"]


def test_secret_key_comes_from_the_environment(
    saga_engine: SagaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_CONSOLE_SECRET_KEY", "from the env")
    app = create_app({"SAGA_ENGINE": saga_engine})
    assert app.config["SECRET_KEY"] == "from the env"


def test_a_missing_secret_key_is_generated_with_a_warning(
    saga_engine: SagaEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SAGA_CONSOLE_SECRET_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="console"):
        first = create_app({"SAGA_ENGINE": saga_engine})
        second = create_app({"SAGA_ENGINE": saga_engine})
    assert first.config["SECRET_KEY"] != second.config["SECRET_KEY"]
    assert "SAGA_CONSOLE_SECRET_KEY is not set" in caplog.text
