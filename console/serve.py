"""Serving the console from a thread of this process (``saga console``, ``saga demo``, tests).

Production uses gunicorn (``gunicorn 'console:create_app()'``); this plain
werkzeug server is for one machine: threaded, no reloader, no debugger.
"""

from __future__ import annotations

import socket
import threading

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    """No access-log line per request (the live pages poll every few seconds)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class ConsoleServer:
    """The console on ``host:port`` in a background thread; ``port=0`` picks a free port."""

    def __init__(
        self, app: Flask, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = True
    ) -> None:
        handler = WSGIRequestHandler if access_log else _QuietHandler
        # Bind here: werkzeug exits the process when a port is taken, and the
        # demo wants an OSError it can answer by taking another port.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family) as sock:
            self.port: int = sock.getsockname()[1]
            self.server: BaseWSGIServer = make_server(
                host,
                self.port,
                app,
                threaded=True,
                request_handler=handler,
                fd=sock.fileno(),
            )
        self.host = host
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="saga-console", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ConsoleServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
