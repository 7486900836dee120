"""Fixtures for the console tests: an engine on a migrated store, the app, and signed-in clients.

The app is built with CSRF off for most tests (they post plain forms);
``test_console_security.py`` builds it with CSRF on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

import engine.users
from engine import SagaEngine
from tests.console.support import make_app, make_engine, sign_in


@pytest.fixture(autouse=True)
def _fast_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    # scrypt costs ~0.1 s a hash by design; the tests do not need that strength.
    monkeypatch.setattr(engine.users, "PASSWORD_HASH_METHOD", "pbkdf2:sha256:1000")


@pytest.fixture
def saga_engine(sqlite_url: str) -> Iterator[SagaEngine]:
    eng = make_engine(sqlite_url)
    yield eng
    eng.close()


@pytest.fixture
def app(saga_engine: SagaEngine) -> Flask:
    return make_app(saga_engine)


@pytest.fixture
def anon(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def viewer(app: Flask) -> FlaskClient:
    return sign_in(app.test_client(), "viewer")


@pytest.fixture
def operator(app: Flask) -> FlaskClient:
    return sign_in(app.test_client(), "operator")


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    return sign_in(app.test_client(), "admin")
