"""Helpers the console tests share: building the engine and app, signing in, making sagas."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient

from console import create_app
from engine import SagaEngine, SagaState, Settings
from engine.model import Instance
from tests.console.console_sagas import FAILING, SAGAS

PASSWORD = "correct horse battery"
ROLES = ("viewer", "operator", "admin")


def make_engine(url: str) -> SagaEngine:
    return SagaEngine(
        SAGAS, settings=Settings(database_url=url, worker_id="test-worker", poll_seconds=0.05)
    )


def make_app(saga_engine: SagaEngine, **config: object) -> Flask:
    """The console on ``saga_engine`` (CSRF off unless asked), with a user for each role."""
    base = {
        "TESTING": True,
        "SAGA_ENGINE": saga_engine,
        "SECRET_KEY": "test secret",
        "WTF_CSRF_ENABLED": False,
    }
    app = create_app({**base, **config})
    users = app.extensions["saga"].users
    for role in ROLES:
        users.add(role, PASSWORD, role)
    return app


def sign_in(client: FlaskClient, name: str, password: str = PASSWORD) -> FlaskClient:
    response = client.post("/login", data={"name": name, "password": password})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


def dead_lettered(saga_engine: SagaEngine, key: str = "ORD-1", **payload: object) -> Instance:
    """An ``order`` whose ``ship`` step failed after the pivot: it waits for an operator."""
    FAILING.add(key)
    try:
        inst = saga_engine.run("order", {"amount": 5, **payload}, business_key=key)
    finally:
        FAILING.discard(key)
    assert inst.state is SagaState.FAILED
    return inst


def text(response: object) -> str:
    return response.get_data(as_text=True)  # type: ignore[attr-defined, no-any-return]
