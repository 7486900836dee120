"""``/metrics``: the Prometheus scrape. No login; a bearer token when one is configured.

The page holds this process's counters and histograms (every gunicorn
worker's, in multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR``) and the
gauges read from the store at scrape time (:class:`engine.metrics.StoreCollector`,
built once in :mod:`console.services`), computed once per scrape by the process
that answers it.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST

from console import services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    metrics = services.get().metrics
    if metrics.token and not _bearer_matches(metrics.token):
        return Response(
            "a bearer token is required (SAGA_METRICS_TOKEN)\n",
            401,
            {"WWW-Authenticate": 'Bearer realm="metrics"'},
            mimetype="text/plain",
        )
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


def _bearer_matches(token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant time: the comparison must not tell an attacker how much was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
