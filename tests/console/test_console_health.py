"""``/healthz`` answers without a login and says whether the store is reachable."""

from __future__ import annotations

from pathlib import Path

from flask.testing import FlaskClient

from console import create_app
from tests.console.support import make_engine


def test_healthy(anon: FlaskClient) -> None:
    response = anon.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "store": "ok"}


def test_unreachable_store_is_503(tmp_path: Path) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'saga.db'}")
    try:
        client = create_app({"SAGA_ENGINE": broken, "SECRET_KEY": "x"}).test_client()
        response = client.get("/healthz")
        assert response.status_code == 503
        assert response.get_json()["store"] == "unreachable"
        page = client.get("/login")  # pages that need the store say so, without a traceback
        assert page.status_code == 200
    finally:
        broken.close()
