"""gunicorn's settings for the console: the one source for production and for the wheel test.

Installed as /etc/saga/gunicorn.conf.py, it is run as (deploy/saga-console.service)::

    gunicorn --config /etc/saga/gunicorn.conf.py

and tests/test_deploy.py runs that same command against the installed wheel. Two
variables adjust it per host; the console reads the rest from ``SAGA_*`` (docs/console.md):

``SAGA_CONSOLE_BIND``
    where to listen (default ``127.0.0.1:8000``: behind a reverse proxy on the same host).
``WEB_CONCURRENCY``
    worker processes (default 2). Each holds a small pool of store connections.
"""

import os
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

wsgi_app = "console:create_app()"
bind = [os.environ.get("SAGA_CONSOLE_BIND", "127.0.0.1:8000")]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# A request that takes longer is a stuck one; the worker is replaced.
timeout = 30
# SIGTERM lets requests in hand finish for this long (systemd's TimeoutStopSec is longer).
graceful_timeout = 30
# Logs go to stderr: the journal under systemd.
accesslog = "-"
errorlog = "-"


def on_starting(server: Any) -> None:
    """Empty the metrics directory: dead processes' counters must not add to the new ones."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for leftover in Path(directory).glob("*.db"):
            leftover.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """A worker that exited no longer counts in the live gauges (multiprocess metrics)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
