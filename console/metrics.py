"""``/metrics``: the Prometheus scrape. No login; a bearer token when one is configured.

The page holds this process's counters and histograms (every gunicorn
worker's, in multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR``) and the
gauges read from the store at scrape time (:class:`engine.metrics.StoreCollector`),
computed once per scrape by the process that answers it.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST

from console import services
from engine import metrics

bp = Blueprint("metrics", __name__)

_KEY = "saga_metrics"


def init_app(app: Flask) -> None:
    """Build the store collector once, on the app's engine."""
    found: services.Services = app.extensions["saga"]
    engine = found.engine
    app.extensions[_KEY] = metrics.StoreCollector(engine.store, engine.registry.names, engine.clock)


@bp.get("/metrics")
def scrape() -> Response:
    token = services.get().engine.settings.metrics_token
    if token and not _bearer_matches(token):
        return Response(
            "a bearer token is required (SAGA_METRICS_TOKEN)\n",
            401,
            {"WWW-Authenticate": 'Bearer realm="metrics"'},
            mimetype="text/plain",
        )
    body = metrics.exposition(current_app.extensions[_KEY])
    return Response(body, content_type=CONTENT_TYPE_LATEST)


def _bearer_matches(token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant time: the comparison must not tell an attacker how much was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
