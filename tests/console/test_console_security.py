"""CSRF on every POST, escaping of untrusted text, and the security headers.

The app here is built with CSRF on, as in production.
"""

from __future__ import annotations

import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import SagaEngine, SagaState
from tests.console.console_sagas import SCRIPT
from tests.console.support import PASSWORD, dead_lettered, make_app, text


@pytest.fixture
def app(saga_engine: SagaEngine) -> Flask:
    return make_app(saga_engine, WTF_CSRF_ENABLED=True)


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


def _sign_in(client: FlaskClient, name: str) -> FlaskClient:
    token = _token(text(client.get("/login")))
    response = client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 302
    return client


class TestCsrf:
    def test_sign_in_without_the_token_is_refused(self, anon: FlaskClient) -> None:
        response = anon.post("/login", data={"name": "operator", "password": PASSWORD})
        assert response.status_code == 400
        assert "could not be trusted" in text(response)
        assert anon.get("/sagas").status_code == 302

    def test_an_action_without_the_token_is_400_and_applies_nothing(
        self, anon: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        client = _sign_in(anon, "operator")
        inst = dead_lettered(saga_engine)
        response = client.post(
            f"/sagas/{inst.id}/actions/cancel",
            data={"reason": "x", "expected_version": inst.version},
        )
        assert response.status_code == 400
        assert "Form expired or tampered" in text(response)
        assert saga_engine.get(inst.id).version == inst.version

    def test_a_forged_token_is_refused(self, anon: FlaskClient, saga_engine: SagaEngine) -> None:
        client = _sign_in(anon, "operator")
        inst = dead_lettered(saga_engine)
        response = client.post(
            f"/sagas/{inst.id}/actions/cancel",
            data={"reason": "x", "expected_version": inst.version, "csrf_token": "forged"},
        )
        assert response.status_code == 400
        assert saga_engine.get(inst.id).state is SagaState.FAILED

    def test_the_token_from_the_confirmation_page_works(
        self, anon: FlaskClient, saga_engine: SagaEngine
    ) -> None:
        client = _sign_in(anon, "operator")
        inst = dead_lettered(saga_engine)
        page = text(client.get(f"/sagas/{inst.id}/actions/cancel?version={inst.version}"))
        response = client.post(
            f"/sagas/{inst.id}/actions/cancel",
            data={
                "reason": "customer gave up",
                "expected_version": inst.version,
                "csrf_token": _token(page),
            },
        )
        assert response.status_code == 302
        assert saga_engine.get(inst.id).state is SagaState.CANCELLED

    def test_sign_out_needs_the_token(self, anon: FlaskClient) -> None:
        client = _sign_in(anon, "viewer")
        assert client.post("/logout").status_code == 400
        assert client.get("/sagas").status_code == 200
        token = _token(text(client.get("/sagas")))
        assert client.post("/logout", data={"csrf_token": token}).status_code == 302
        assert client.get("/sagas").status_code == 302

    def test_user_management_needs_the_token(self, anon: FlaskClient, app: Flask) -> None:
        client = _sign_in(anon, "admin")
        response = client.post(
            "/users", data={"name": "mallory", "role": "admin", "password": "long enough pw"}
        )
        assert response.status_code == 400
        assert app.extensions["saga"].users.by_name("mallory") is None
        assert client.post("/users/viewer/disable").status_code == 400
        assert client.post("/users/viewer/role", data={"role": "admin"}).status_code == 400


class TestEscaping:
    @pytest.fixture
    def hostile_id(self, saga_engine: SagaEngine) -> str:
        inst = saga_engine.run(
            "hostile", {"note": SCRIPT}, business_key=SCRIPT, correlation_id=f"corr-{SCRIPT}"
        )
        assert inst.state is SagaState.FAILED  # its error texts carry the script too
        saga_engine.operations.cancel(inst.id, actor="operator", reason=f"why {SCRIPT}")
        return inst.id

    def _assert_inert(self, html: str) -> None:
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(" in html

    @pytest.mark.parametrize("page", ["/sagas/{id}", "/sagas", "/search?q={id}", "/audit"])
    def test_a_script_in_payload_keys_errors_and_reasons_renders_inert(
        self, anon: FlaskClient, hostile_id: str, page: str
    ) -> None:
        client = _sign_in(anon, "viewer")
        html = text(client.get(page.format(id=hostile_id)))
        self._assert_inert(html)

    def test_the_instance_page_escapes_payload_and_error_text(
        self, anon: FlaskClient, hostile_id: str
    ) -> None:
        html = text(_sign_in(anon, "viewer").get(f"/sagas/{hostile_id}"))
        payload = html.split('id="payload"')[1].split("</section>")[0]
        self._assert_inert(payload)
        steps = html.split('id="steps"')[1].split("</section>")[0]
        assert "participant said &lt;script&gt;" in steps
        assert "undo failed too &lt;script&gt;" in steps

    def test_a_script_in_the_search_box_renders_inert(self, anon: FlaskClient) -> None:
        html = text(_sign_in(anon, "viewer").get("/search", query_string={"q": SCRIPT}))
        self._assert_inert(html)

    def test_a_script_in_an_error_message_renders_inert(self, anon: FlaskClient) -> None:
        client = _sign_in(anon, "viewer")
        response = client.get("/sagas", query_string={"state": SCRIPT})
        assert response.status_code == 400
        self._assert_inert(text(response))
        missing = client.get(f"/sagas/{SCRIPT}")
        assert missing.status_code == 404
        assert "<script>alert" not in text(missing)


def test_pages_forbid_inline_script_and_framing(anon: FlaskClient) -> None:
    response = anon.get("/login")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
